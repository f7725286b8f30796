-- wrk script: new events through the API, unique event_id per thread and request.
--   wrk ... -s events.lua URL            POST /events, one event per request
--   wrk ... -s events.lua URL -- batch   POST /events/batch, 1,000 events per request
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local batch = false
function init(args)
  batch = args[1] == "batch"
end

local n = 0
local function event(i, accounts)
  return string.format('{"account_id":%d,"event_id":"t%d-%d-%d"}', i % accounts + 1, tid, n, i)
end

function request()
  n = n + 1
  if not batch then
    return wrk.format("POST", "/events", {["Content-Type"] = "application/json"}, event(n, 1000))
  end
  local events = {}
  for i = 1, 1000 do
    events[i] = event(n * 1000 + i, 5000)
  end
  local body = '{"events":[' .. table.concat(events, ",") .. ']}'
  return wrk.format("POST", "/events/batch", {["Content-Type"] = "application/json"}, body)
end
