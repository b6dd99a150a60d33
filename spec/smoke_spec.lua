local moonlet = require "moonlet"
local test = require "moonlet.test"
describe("smoke", function()
  it("serves hello and sleeps", function()
    local app = moonlet.app()
    app:get("/", function() moonlet.sleep(0.01); return "hi" end)
    local server, port = test.serve(app)
    local r = test.request(port, "GET", "/")
    assert.same(200, r.status)
    assert.same("hi", r.body)
    server:close()
  end)
end)
