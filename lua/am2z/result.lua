--[[
am2z.result: the Success/Failure values processors return, and the small
combinators users compose them with.

Results are plain tables `{ success = true, data = ... }` and
`{ success = false, error = ... }` with no metatable: they are stored on
jobs and sent through Redis as JSON, and must mean the same on the other
side.

What this module must not do:
  * give results a metatable or extra fields (they would not survive JSON);
  * convert the error inside Failure(err): the runtime does that once, where
    it knows the processor name and execution id;
  * swallow misuse: wrong argument types raise at the caller (level 2) with
    the function's name and what was expected.
]]

local type, tostring, next = type, tostring, next
local error, xpcall = error, xpcall
local traceback = debug.traceback

local errors = require("am2z.errors")
local errors_from, errors_is, AM2ZError = errors.from, errors.is, errors.AM2ZError

---@class am2z.Result
---@field success boolean
---@field data any present when success is true
---@field error any present when success is false

---@class am2z.ResultHandlers
---@field success fun(data: any): any
---@field failure fun(err: any): any

local result = {}

local function describe(v)
  local t = type(v)
  if t == "string" then return ("string %q"):format(v) end
  if t == "number" or t == "boolean" then return t .. " " .. tostring(v) end
  return t
end

local function is_result(r)
  return type(r) == "table" and type(r.success) == "boolean"
end

-- `level` 3: the check runs inside the public function, the culprit is
-- whoever called that function.
local function check_result(fname, r, argn)
  if not is_result(r) then
    error(fname .. ": expected a result table { success = boolean, ... } as argument "
      .. argn .. ", got " .. describe(r), 3)
  end
end

local function check_function(fname, fn, argn)
  if type(fn) ~= "function" then
    error(fname .. ": expected a function as argument " .. argn .. ", got " .. describe(fn), 3)
  end
end

---@param data any
---@return am2z.Result
function result.Success(data)
  return { success = true, data = data }
end

---The error is kept exactly as given; the runtime converts it to an am2z
---error later.
---@param err any
---@return am2z.Result
function result.Failure(err)
  return { success = false, error = err }
end

---True for any table shaped like a result (boolean `success`).
---@param r any
---@return boolean
function result.isResult(r)
  return is_result(r)
end

---@param r any
---@return boolean
function result.isSuccess(r)
  return type(r) == "table" and r.success == true
end

---@param r any
---@return boolean
function result.isFailure(r)
  return type(r) == "table" and r.success == false
end

---Calls `handlers.success(data)` or `handlers.failure(err)` and returns
---what it returns.
---@param r am2z.Result
---@param handlers am2z.ResultHandlers
---@return any
function result.matchResult(r, handlers)
  check_result("matchResult", r, 1)
  -- Both handlers are required even though only one runs: a missing branch
  -- is a bug that would otherwise only show on the rarer path.
  if type(handlers) ~= "table" or type(handlers.success) ~= "function"
      or type(handlers.failure) ~= "function" then
    error("matchResult: expected a table { success = function, failure = function } as argument 2, got "
      .. describe(handlers), 2)
  end
  if r.success then return handlers.success(r.data) end
  return handlers.failure(r.error)
end

---Success(fn(data)) for a success; a failure is returned unchanged.
---@param r am2z.Result
---@param fn fun(data: any): any
---@return am2z.Result
function result.mapResult(r, fn)
  check_result("mapResult", r, 1)
  check_function("mapResult", fn, 2)
  if r.success then return { success = true, data = fn(r.data) } end
  return r
end

---Failure(fn(err)) for a failure; a success is returned unchanged.
---@param r am2z.Result
---@param fn fun(err: any): any
---@return am2z.Result
function result.mapError(r, fn)
  check_result("mapError", r, 1)
  check_function("mapError", fn, 2)
  if not r.success then return { success = false, error = fn(r.error) } end
  return r
end

---fn(data) for a success (fn must return a result); a failure is returned
---unchanged.
---@param r am2z.Result
---@param fn fun(data: any): am2z.Result
---@return am2z.Result
function result.chainResult(r, fn)
  check_result("chainResult", r, 1)
  check_function("chainResult", fn, 2)
  if not r.success then return r end
  local nextR = fn(r.data)
  if not is_result(nextR) then
    error("chainResult: expected the function to return a result table, got " .. describe(nextR), 2)
  end
  return nextR
end

---Success(list of data, in order) when all are successes, else the first
---failure in list order.
---@param list am2z.Result[]
---@return am2z.Result
function result.combineResults(list)
  if type(list) ~= "table" then
    error("combineResults: expected a list of result tables as argument 1, got " .. describe(list), 2)
  end
  local n = #list
  -- Validate everything first: a non-result after a failure is still a bug.
  for i = 1, n do
    if not is_result(list[i]) then
      error("combineResults: expected a result table at position " .. i .. ", got " .. describe(list[i]), 2)
    end
  end
  local data = {}
  for i = 1, n do
    local r = list[i]
    if not r.success then return r end
    data[i] = r.data
  end
  return { success = true, data = data }
end

---The data of a success; raises the error value of a failure (a string
---error stays a string, prefixed with the caller's position).
---@param r am2z.Result
---@return any
function result.unwrapResult(r)
  check_result("unwrapResult", r, 1)
  if r.success then return r.data end
  error(r.error, 2)
end

---The data of a success, else `default`.
---@param r am2z.Result
---@param default any
---@return any
function result.unwrapOr(r, default)
  check_result("unwrapOr", r, 1)
  if r.success then return r.data end
  return default
end

-- A returned table counts as a result only when it cannot be mistaken for
-- user data: boolean success plus data or error, or nothing at all besides
-- success (that is what Success(nil) looks like).
local function looks_like_result(v)
  if type(v) ~= "table" or type(v.success) ~= "boolean" then return false end
  if v.data ~= nil or v.error ~= nil then return true end
  return next(v) == "success" and next(v, "success") == nil
end

-- Error handler for xpcall. am2z errors are passed through untouched (they
-- were raised on purpose); anything else gets the traceback recorded while
-- the stack is still there to read.
local function on_error(raised)
  if type(raised) == "table" and errors_is(raised, AM2ZError) then
    return errors_from(raised)
  end
  local e = errors_from(raised)
  e.details.traceback = traceback(tostring(raised), 2)
  return e
end

local function run(fn, ...)
  local ok, v = xpcall(fn, on_error, ...)
  if not ok then return { success = false, error = v } end
  if looks_like_result(v) then return v end
  return { success = true, data = v }
end

---Runs fn(...) protected: Success(first return value), or Failure(err)
---with the raised value as an am2z error (non-am2z values get
---`details.traceback`). A result returned by fn is passed through.
---@param fn fun(...): any
---@param ... any
---@return am2z.Result
function result.safeSync(fn, ...)
  check_function("safeSync", fn, 1)
  return run(fn, ...)
end

---Same as safeSync, for functions that yield (ctx:sleep, ctx:call, Redis
---calls). LuaJIT can yield across pcall/xpcall, so no separate
---coroutine-aware machinery is needed; the two names exist because users
---coming from the TypeScript API expect both.
---@param fn fun(...): any
---@param ... any
---@return am2z.Result
function result.safeAsync(fn, ...)
  check_function("safeAsync", fn, 1)
  return run(fn, ...)
end

return result
