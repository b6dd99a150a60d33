-- examples/bench_hello.lua: the benchmark app of `make bench` (scripts/bench.sh). GET / answers
-- "Hello, World!" as text/plain and nothing else: no middleware, no other route, so moonlet does the
-- same work as the peers of ../shared/bench/peers.sh (nginx+lua's content_by_lua_block, node, ...).
local moonlet = require "moonlet"
local app = moonlet.app()

app:get("/", function() return "Hello, World!" end)

return app
