-- bench/wrk_paced.lua: a wrk script that paces each connection: after every response the
-- connection waits PACE milliseconds before its next request (wrk's delay()). With C connections
-- the offered load is about C / (PACE + latency) requests per second whatever the server, so two
-- servers are compared at the same load instead of each at its own saturation point, where wrk
-- (one thread on one vCPU) is itself the bottleneck and its own queueing makes the tail.
--   wrk -t1 -c64 -d5s --latency -s bench/wrk_paced.lua http://127.0.0.1:8080/ -- 1
local pace = 1

function init(args)
    pace = tonumber(args[1]) or 1
end

function delay()
    return pace
end
