-- lua/moonlet/busted_output.lua: busted's output for `moonlet test`: busted's own gtest-style
-- report (one line per test, so a hang shows where it is), then the one closing line the tooling
-- reads: "tests: N passed, M failed" (errors count as failed; ", K skipped" when some are pending).
-- The counts are also left in package.loaded["moonlet.busted_output"].results for the CLI.
-- Each test starts with moonlet.http's pool of idle connections emptied: a connection an earlier
-- test left there would otherwise close at its idle timeout in the middle of a later test and move
-- the handle counts its leak check compares.
local results = { passed = 0, failed = 0, skipped = 0 }

local function new(options)
    local busted = require "busted"
    local inner = require("busted.outputHandlers.gtest")(options)
    local subscribe = inner.subscribe
    inner.subscribe = function(h, opts)
        -- An error outside a test (a spec file that does not load, a path that is not there) comes
        -- with a trace that has no file: gtest's summary would concatenate nil and end the run
        -- before the closing line. It gets the element's name (else the message) and line 0.
        busted.subscribe({ "error" }, function(element, _, message, trace)
            local where = element and element.name or tostring(message or "?")
            for _, t in ipairs({ element and element.trace or false, trace or false }) do
                if t and not t.short_src then
                    t.short_src = where
                    t.currentline = t.currentline or 0
                end
            end
            if element and not element.trace then
                element.trace = trace or { short_src = where, currentline = 0 }
            end
            return nil, true
        end, { priority = 1 })
        subscribe(h, opts)
        busted.subscribe({ "test", "start" }, function()
            local client = package.loaded["moonlet.http_client"]
            if client then client.close_idle() end
            return nil, true
        end)
        busted.subscribe({ "suite", "end" }, function()
            results.passed = h.successesCount
            results.failed = h.failuresCount + h.errorsCount
            results.skipped = h.pendingsCount
            local line = ("tests: %d passed, %d failed"):format(results.passed, results.failed)
            if results.skipped > 0 then line = line .. (", %d skipped"):format(results.skipped) end
            io.write(line, "\n")
            io.flush()
            return nil, true
        end)
    end
    return inner
end

return setmetatable({ results = results }, { __call = function(_, options) return new(options) end })
