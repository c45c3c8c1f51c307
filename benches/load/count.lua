-- count.lua: wrk script for the toggle-under-load test of benches/load.sh.
--
-- Counts every response by kind, per wrk thread, and prints one summary line at the end:
--
--   COUNT total=N ok200=N held503=N unexpected=N badbody=N statuses=CODE:N,...
--
-- ok200      the upstream's 200, with exactly the expected body length (when given)
-- held503    a 503 carrying `x-intermission-mode: maintenance` (a held response)
-- unexpected anything else: another status, a 503 that is not a maintenance hold (e.g. an
--            outage), or a 200 whose body is not the upstream's
--
-- Usage: wrk ... -s count.lua http://127.0.0.1:PORT/ -- EXPECTED_200_BODY_BYTES
-- Defining response() makes wrk parse every response into Lua, so this script is only used
-- where correctness is measured, never for the throughput rows.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   expect_len = tonumber(args[1] or "")
   ok200 = 0
   held503 = 0
   unexpected = 0
   badbody = 0
   other_status = {}
end

local function header(headers, name)
   local v = headers[name]
   if v ~= nil then
      return v
   end
   for k, val in pairs(headers) do
      if string.lower(k) == name then
         return val
      end
   end
   return nil
end

function response(status, headers, body)
   if status == 200 then
      if expect_len ~= nil and (body == nil or #body ~= expect_len) then
         badbody = badbody + 1
         unexpected = unexpected + 1
      else
         ok200 = ok200 + 1
      end
   elseif status == 503 and header(headers, "x-intermission-mode") == "maintenance" then
      held503 = held503 + 1
   else
      unexpected = unexpected + 1
      local key = tostring(status)
      if status == 503 then
         key = "503/" .. tostring(header(headers, "x-intermission-mode"))
      end
      other_status[key] = (other_status[key] or 0) + 1
   end
end

function done(summary, latency, requests)
   local t200, t503, tbad, tbody = 0, 0, 0, 0
   local codes = {}
   for _, t in ipairs(threads) do
      t200 = t200 + t:get("ok200")
      t503 = t503 + t:get("held503")
      tbad = tbad + t:get("unexpected")
      tbody = tbody + t:get("badbody")
      local os = t:get("other_status")
      if os ~= nil then
         for k, n in pairs(os) do
            codes[k] = (codes[k] or 0) + n
         end
      end
   end
   local parts = {}
   for k, n in pairs(codes) do
      table.insert(parts, k .. ":" .. n)
   end
   table.sort(parts)
   local statuses = "-"
   if #parts > 0 then
      statuses = table.concat(parts, ",")
   end
   io.write(string.format("COUNT total=%d ok200=%d held503=%d unexpected=%d badbody=%d statuses=%s\n",
      t200 + t503 + tbad, t200, t503, tbad, tbody, statuses))
end
