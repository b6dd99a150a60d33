-- lua/moonlet/busted_output.lua: busted's output for `moonlet test`: busted's own gtest-style
-- report (one line per test, so a hang shows where it is), then the one closing line the tooling
-- reads: "tests: N passed, M failed" (errors count as failed; ", K skipped" when some are pending).
-- The counts are also left in package.loaded["moonlet.busted_output"].results for the CLI.
local results = { passed = 0, failed = 0, skipped = 0 }

local function new(options)
    local busted = require "busted"
    local inner = require("busted.outputHandlers.gtest")(options)
    local subscribe = inner.subscribe
    inner.subscribe = function(h, opts)
        subscribe(h, opts)
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
