--- luasmtp.delivery.connect: Happy Eyeballs (RFC 8305) over a host's
-- addresses.
--
--   connect(addresses, port, opts) -> sock, attempt | nil, token, detail, attempts
--
-- addresses come interleaved (IPv6, IPv4, ...). The first connect starts
-- at once; each next one starts when the previous failed or after
-- opts.delay (0.25 s, RFC 8305 section 5) without an answer, whichever
-- is first. The first to connect wins and the others are abandoned. One
-- deadline covers the whole step. opts.failed is a set of "address port"
-- keys shared by the attempts of one delivery: addresses in it are not
-- tried again, and those that fail to connect here are added to it.
-- opts.skip (a set of addresses) leaves more out, for this call only.
local core = require "luasmtp.core"

local M = {}

M.DELAY = 0.25

local function key(address, port)
  return address .. " " .. port
end

--- connect(addresses, port, opts) -> sock, attempt | nil, token, detail, attempts
-- addresses: { {address=, family=}, ... }. opts: timeout (seconds for
-- the whole step, 30), delay, failed, skip, bind. attempts (also the second
-- return on success, attempts[i] for the winner) lists each address in
-- the order tried: { address, family, result = "connected" | token,
-- detail }.
function M.connect(addresses, port, opts)
  opts = opts or {}
  local failed = opts.failed or {}
  local skip = opts.skip or {}
  local delay = opts.delay or M.DELAY
  local deadline = core.update_now() + (opts.timeout or 30)
  local todo = {}
  for _, a in ipairs(addresses) do
    if not failed[key(a.address, port)] and not skip[a.address] then todo[#todo + 1] = a end
  end
  local attempts = {}
  if #todo == 0 then
    return nil, "unreachable", "every address was tried already in this delivery", attempts
  end
  local cond = core.cond()
  local winner, winner_attempt
  local running, finished = 0, 0

  local function start(a)
    local attempt = { address = a.address, family = a.family, pending = {} }
    attempts[#attempts + 1] = attempt
    running = running + 1
    core.spawn(function()
      local sock, token, detail = core.connect(a.address, port, {
        timeout = math.max(deadline - core.update_now(), 0.001),
        bind = opts.bind,
        pending = attempt.pending,
      })
      attempt.pending = nil
      running = running - 1
      finished = finished + 1
      if sock then
        if winner or attempt.abandoned then
          sock:close()
          attempt.result, attempt.detail = "abandoned", "another address connected first"
          attempt.abandoned = true
        else
          winner, winner_attempt = sock, attempt
          attempt.result = "connected"
        end
      elseif not attempt.abandoned then
        attempt.result, attempt.detail = token, detail
        failed[key(a.address, port)] = true
      end
      cond:signal()
    end)
  end

  local next_index, last_started = 1, nil
  while not winner do
    local now = core.update_now()
    if now >= deadline then break end
    local seen = finished
    if next_index <= #todo and (running == 0 or now - last_started >= delay) then
      start(todo[next_index])
      next_index = next_index + 1
      last_started = now
    elseif next_index > #todo and running == 0 then
      break
    else
      local wait = deadline - now
      if next_index <= #todo then
        wait = math.min(wait, last_started + delay - now)
      end
      cond:wait(math.max(wait, 0.001))
      -- a failure starts the next address at once (RFC 8305 section 5)
      if finished > seen and not winner then last_started = -math.huge end
    end
  end
  -- abandon the attempts still waiting (their tasks end with "closed"):
  -- after a winner they were merely slower; without one they timed out
  for _, attempt in ipairs(attempts) do
    if not attempt.result then
      attempt.abandoned = true
      if winner then
        attempt.result, attempt.detail = "abandoned", "another address connected first"
      else
        attempt.result, attempt.detail = "timeout", "connect timed out"
        failed[key(attempt.address, port)] = true
      end
      if attempt.pending and attempt.pending.socket then
        attempt.pending.socket:close()
      end
    end
  end
  cond:close()
  if winner then
    return winner, winner_attempt, attempts
  end
  local last = attempts[#attempts]
  local detail = {}
  for _, attempt in ipairs(attempts) do
    detail[#detail + 1] = ("%s: %s"):format(attempt.address, tostring(attempt.detail or attempt.result))
  end
  return nil, (last and last.result ~= "abandoned" and last.result) or "timeout", table.concat(detail, "; "),
    attempts
end

return M
