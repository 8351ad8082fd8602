-- Shared by every spec (loaded with busted's --helper). Keeps the timeout
-- scaling in one place so slow runs (ASan, valgrind) only set an env var.
local mult = tonumber(os.getenv("AM2Z_TEST_TIMEOUT_MULT")) or 1
TEST_TIMEOUT_MS = 5000 * mult
