-- Private redis-servers for the specs that kill or restart one (the suite's
-- own server, AM2Z_TEST_REDIS_URL, is shared and must stay up).
--
-- Ports are taken below the kernel's ephemeral range: a port in that range
-- may be the local end of one of the suite's own client connections (or in
-- TIME-WAIT from one), and then redis-server cannot bind it. A server that
-- still does not come up is retried on another port.
local M = {}

local function read_file(p)
  local f = io.open(p)
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- LuaJIT's math.random is the same sequence in every process unless seeded.
do
  local f = io.open("/dev/urandom", "rb")
  local b = f and f:read(4)
  if f then f:close() end
  local seed = os.time()
  if b then for i = 1, #b do seed = seed * 256 + b:byte(i) end end
  math.randomseed(seed % 2147483647)
end

local function ephemeral_low()
  local s = read_file("/proc/sys/net/ipv4/ip_local_port_range")
  return tonumber(s and s:match("^(%d+)")) or 32768
end

local function answers(port)
  -- (LuaJIT's os.execute returns the exit status: 0 when the port answered)
  local rc = os.execute(("bash -c '(exec 3<>/dev/tcp/127.0.0.1/%d)' 2>/dev/null"):format(port))
  return rc == 0 or rc == true
end

local function pid_of(port)
  local p = io.popen(("redis-cli -p %d info server 2>/dev/null"):format(port))
  local info = p:read("*a")
  p:close()
  return tonumber(info:match("process_id:(%d+)"))
end

local function pick_port()
  local low = ephemeral_low()
  if low > 13025 then return math.random(low - 12000, low - 1), low end
  -- no room below the range: any port may clash, the retries cover it
  return math.random(20000, 29999), low
end

--- A loopback port nothing listens on (below the ephemeral range).
function M.free_port()
  for _ = 1, 20 do
    local port = pick_port()
    if not answers(port) then return port end
  end
  error("no free port")
end

local Server = {}
Server.__index = Server

-- Starts redis-server on self.port and waits (bounded) until it answers.
-- Returns false when it did not come up (the port could not be bound).
function Server:_launch(wait_ms)
  local pidfile = self.dir .. "/redis.pid"
  os.remove(pidfile)
  os.execute(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --dir %s "
    .. "--daemonize yes --pidfile %s > /dev/null 2>&1"):format(self.port, self.dir, pidfile))
  local tries = math.ceil(wait_ms / 25)
  for _ = 1, tries do
    -- ours (its pidfile says so), not another server on the port
    local pid, mine = pid_of(self.port), tonumber(read_file(pidfile) or "")
    if pid and pid == mine then
      self.pid = pid
      return true
    end
    os.execute("sleep 0.025")
  end
  local mine = tonumber(read_file(pidfile) or "")
  if mine then os.execute(("kill -9 %d 2>/dev/null"):format(mine)) end
  return false
end

--- Starts a private redis-server: { port, pid, url, dir }. Raises when none
--- comes up on any of several ports.
function M.start(opts)
  opts = opts or {}
  local p = io.popen("mktemp -d")
  local dir = p:read("*l")
  p:close()
  local s = setmetatable({ dir = dir }, Server)
  local low
  for _ = 1, 8 do
    local port
    port, low = pick_port()
    if not answers(port) then
      s.port = port
      if s:_launch(opts.waitMs or 5000) then
        s.url = ("redis://127.0.0.1:%d"):format(port)
        return s
      end
    end
  end
  os.execute("rm -rf " .. dir)
  error("could not start a private redis-server (tried 8 ports below " .. low .. ")")
end

--- kill -9, then wait until the port no longer answers (bounded).
function Server:kill()
  if not self.pid then return end
  os.execute(("kill -9 %d 2>/dev/null"):format(self.pid))
  self.pid = nil
  for _ = 1, 400 do
    if not answers(self.port) then return end
    os.execute("sleep 0.01")
  end
  error("redis-server on port " .. self.port .. " did not go away")
end

--- Starts it again on the same port (after kill).
function Server:restart()
  if not self:_launch(5000) then
    error("redis-server did not come back on port " .. self.port)
  end
end

--- Kills it (if running) and removes its directory.
function Server:cleanup()
  pcall(self.kill, self)
  os.execute("rm -rf " .. self.dir)
end

return M
