-- lua/moonlet/router.lua: routes from (method, pattern) to handlers. Patterns are literal paths
-- ("/about"), with named parameters ("/users/:id") and a trailing splat ("/files/*path" or "/*").
-- Literal paths are one table lookup; patterns are tried in the order they were added. Matching
-- works on the raw path, so an encoded "/" (%2F) never splits a segment; parameters are decoded,
-- and so is a segment compared with a literal one (a browser asks for "/café/1" as "/caf%C3%A9/1").
local url = require "moonlet.url"

local str_find, str_sub = string.find, string.sub
local unescape, split_path = url.unescape, url.split_path
local pairs, setmetatable, sort, concat = pairs, setmetatable, table.sort, table.concat

local _M = {}
local methods = {}
local mt = { __name = "moonlet.router", __index = methods }

-- syntax: r = router.new()
function _M.new()
    return setmetatable({ exact = {}, dynamic = {}, by_pattern = {} }, mt)
end

local function compile(pattern)
    local segs = split_path(pattern)
    local out = {}
    for i, s in ipairs(segs) do
        local c = str_sub(s, 1, 1)
        if c == ":" then
            out[i] = { param = str_sub(s, 2) }
        elseif c == "*" then
            if i ~= #segs then error("moonlet: a splat must end the pattern: " .. pattern, 4) end
            local name = str_sub(s, 2)
            out[i] = { splat = name ~= "" and name or "splat" }
        else
            out[i] = { literal = s }
        end
    end
    return out
end

-- syntax: r:add(method, pattern, handler) -- method "GET", ... or "*" for any
function methods:add(method, pattern, handler)
    if type(pattern) ~= "string" or str_sub(pattern, 1, 1) ~= "/" then
        error("moonlet: a route pattern starts with /: " .. tostring(pattern), 3)
    end
    if type(handler) ~= "function" then error("moonlet: a route handler is a function", 3) end
    if not str_find(pattern, "[:*]") then
        local e = self.exact[pattern]
        if not e then e = {}; self.exact[pattern] = e end
        e[method] = handler
        return
    end
    local route = self.by_pattern[pattern]
    if not route then
        route = { segs = compile(pattern), handlers = {}, pattern = pattern }
        self.by_pattern[pattern] = route
        self.dynamic[#self.dynamic + 1] = route
    end
    route.handlers[method] = handler
end

local function pick(handlers, method)
    return handlers[method] or (method == "HEAD" and handlers.GET) or handlers["*"]
end

-- Route segments i..n against the path's; params so far. A tail call per segment rather than a
-- loop, as url.split_path: the dispatcher's trace stays whole (no inner loop in a root trace).
-- (A loop here is unrolled into that trace only after some aborts, "leaving loop in root trace",
-- and not in every process: GET /users/42?q=x of examples/hello.lua took 18.5k-20.5k
-- instructions with it, 18.3k-18.7k with the tail calls.)
local function match_from(rsegs, psegs, i, n, params)
    if i > n then
        if #psegs ~= n then return nil end
        return params or {}
    end
    local rs, ps = rsegs[i], psegs[i]
    if rs.splat then
        local rest = concat(psegs, "/", i)
        params = params or {}
        params[rs.splat] = unescape(rest)
        return params
    end
    if ps == nil then return nil end
    if rs.literal then
        if rs.literal ~= ps and not (str_find(ps, "%", 1, true) and rs.literal == unescape(ps)) then
            return nil
        end
    else
        if ps == "" then return nil end
        params = params or {}
        params[rs.param] = unescape(ps)
    end
    return match_from(rsegs, psegs, i + 1, n, params)
end

local function match_segs(rsegs, psegs)
    return match_from(rsegs, psegs, 1, #rsegs, nil)
end

-- The Allow header of the routes in found (their handler tables), methods in skip (a set of
-- handlers, else nil) left out; nil when one of them takes any method
local function allow_list(found, skip, extra)
    local list = {}
    for _, handlers in ipairs(found) do
        for m, h in pairs(handlers) do
            if not (skip and skip[h]) then
                if m == "*" then return nil end
                list[#list + 1] = m
                if m == "GET" then list[#list + 1] = "HEAD" end
            end
        end
    end
    for m in (extra or ""):gmatch("[^, ]+") do list[#list + 1] = m end
    if not list[1] then return nil end
    local seen, uniq = {}, {}
    for _, m in ipairs(list) do
        if not seen[m] then seen[m] = true; uniq[#uniq + 1] = m end
    end
    sort(uniq)
    return concat(uniq, ", ")
end

-- syntax: allow = r:allow(raw_path, skip, extra) -- the Allow header of the routes that could
-- serve the path but for their method, merged with the list extra; nil if none. skip is a set of
-- handlers (app:mount's) left out: the first pattern route that has one took the path, and the
-- pattern routes after it are never tried for it.
function methods:allow(path, skip, extra)
    local found = {}
    local e = self.exact[path]
    if not e and str_find(path, "%", 1, true) then e = self.exact[unescape(path)] end
    local taken = false -- the exact path is a mount's own (its prefix): no pattern is tried
    if e then
        found[1] = e
        for _, h in pairs(e) do
            if skip and skip[h] then taken = true end
        end
    end
    local dyn = not taken and self.dynamic or {}
    if dyn[1] then
        local psegs = split_path(path)
        for i = 1, #dyn do
            local route = dyn[i]
            if match_segs(route.segs, psegs) then
                local hidden = false
                for _, h in pairs(route.handlers) do
                    if skip and skip[h] then hidden = true end
                end
                found[#found + 1] = route.handlers -- (its handlers but the mount's count)
                if hidden then break end
            end
        end
    end
    return allow_list(found, skip, extra)
end

-- The pattern routes dyn[i..n] against the path's segments, in order: the first that matches
-- with a handler for method gives handler, params; else nil, found (found and the handler tables
-- of the routes that matched for other methods). A tail call per route, as match_from: the
-- routes' loop was an inner loop in the dispatcher's root trace in some processes (spec/
-- router_spec.lua saw it under ASan, whose addresses change LuaJIT's hot counters).
local function match_routes(dyn, i, n, psegs, method, found)
    if i > n then return nil, found end
    local route = dyn[i]
    local params = match_segs(route.segs, psegs)
    if params then
        local h = pick(route.handlers, method)
        if h then return h, params end
        found = found or {}
        found[#found + 1] = route.handlers
    end
    return match_routes(dyn, i + 1, n, psegs, method, found)
end

-- syntax: handler, params, allow = r:match(method, raw_path)
-- handler and params on a match; nil, nil, "GET, HEAD" when the path exists for other methods only;
-- nil when nothing matches.
function methods:match(method, path)
    local e = self.exact[path]
    if not e and str_find(path, "%", 1, true) then e = self.exact[unescape(path)] end
    local found
    if e then
        local h = pick(e, method)
        if h then return h, nil end
        found = { e }
    end
    local dyn = self.dynamic
    if dyn[1] then
        local h, params = match_routes(dyn, 1, #dyn, split_path(path), method, found)
        if h then return h, params end
        found = params -- (nil, found: see match_routes)
    end
    if found then return nil, nil, allow_list(found) end
    return nil
end

return _M
