-- lua/moonlet/multipart.lua: multipart/form-data bodies (RFC 7578: HTML forms with file uploads).
-- Read as they arrive: req:parts() gives each part with its headers and reads the part's data piece
-- by piece, so an upload of any size (up to the server's max_body) never has to be whole in memory;
-- req:form() reads a whole form with it: fields as strings, files as tables. Written by encode(),
-- which moonlet.http uses for a `form` with files in it.
--
-- A body that breaks the format (no boundary, a part with no Content-Disposition name, headers
-- over 8 KiB, a body that ends inside a part) raises moonlet.abort(400): unhandled, the client gets
-- 400 and the handler's error is not logged as a server fault. A body that cannot be read (the
-- client went away, a timeout) raises as req:chunks() does.
local abort = require("moonlet.response").abort
local trim = require("moonlet.url").trim

local find, sub, lower, match, gsub, char = string.find, string.sub, string.lower, string.match,
    string.gsub, string.char
local concat, sort = table.concat, table.sort
local tonumber, tostring, type, pairs, ipairs, setmetatable, error =
    tonumber, tostring, type, pairs, ipairs, setmetatable, error

local _M = {}

local MAX_HEADERS = 8 * 1024 -- bytes of one part's header block
local MAX_FORM_PARTS = 1000  -- parts req:form() takes in one body

local function bad(reason)
    error(abort(400, "400 Bad Request: multipart: " .. reason .. "\n"), 0)
end

-- The parameters after a header's first value: `form-data; name="a"; filename="b.txt"` ->
-- { name = "a", filename = "b.txt" }, names in lower case, the first of a name kept. A quoted value
-- may hold ";" and quoted pairs (\" and \\ stand for " and \).
local function params_of(value)
    local p = {}
    local pos = find(value, ";", 1, true)
    while pos do
        local key, at = match(value, "^;%s*([^=;%s]+)%s*=%s*()", pos)
        if not key then
            pos = find(value, ";", pos + 1, true) -- a parameter without a value
        else
            local v
            if sub(value, at, at) == '"' then
                local out, i, n = {}, at + 1, #value
                while i <= n do
                    local c = sub(value, i, i)
                    if c == '"' then break end
                    if c == "\\" and i < n then
                        i = i + 1
                        c = sub(value, i, i)
                    end
                    out[#out + 1] = c
                    i = i + 1
                end
                v = concat(out)
                pos = find(value, ";", i + 1, true)
            else
                pos = find(value, ";", at, true)
                v = trim(sub(value, at, pos and pos - 1 or #value))
            end
            key = lower(key)
            if p[key] == nil then p[key] = v end
        end
    end
    return p
end

-- syntax: boundary = multipart.boundary(content_type) -- that of a multipart/form-data type; nil for
-- another type; false, reason for multipart/form-data without a usable boundary
function _M.boundary(ctype)
    if not ctype then return nil end
    local mtype, params = match(ctype, "^%s*([^;%s]+)%s*(.*)$")
    if not mtype or lower(mtype) ~= "multipart/form-data" then return nil end
    local b = params_of(params).boundary
    if not b then return false, "no boundary" end
    if #b < 1 or #b > 70 then return false, "a boundary of 1 to 70 characters" end -- RFC 2046
    return b
end

-- The parameters of a part's Content-Disposition, with RFC 5987's filename* decoded into filename.
local function disposition_params(value)
    local p = params_of(value)
    local ext = p["filename*"] -- RFC 5987: charset'language'percent-encoded
    if ext then
        local enc = match(ext, "^[^']*'[^']*'(.*)$")
        if enc then
            p.filename = (gsub(enc, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
        end
    end
    return p
end

-- -- The reader: a buffer over the body's pieces -------------------------------------------------

local reader_mt = {}
reader_mt.__index = reader_mt

-- Appends the next piece of the body; false at its end.
function reader_mt:fill()
    local piece = self.source()
    if not piece then return false end
    local buf, pos = self.buf, self.pos
    self.buf = pos > #buf and piece or sub(buf, pos) .. piece
    self.pos = 1
    return true
end

-- The part headers after a delimiter line: { [lower-case name] = value }, the part's disposition
-- parameters; or nil when the delimiter was the closing one.
function reader_mt:next_head()
    -- at a delimiter ("\r\n--boundary"): then "--" (the end) or padding and CRLF
    while #self.buf - self.pos + 1 < #self.delim + 2 do
        if not self:fill() then bad("the body ended before its closing boundary") end
    end
    local at = self.pos + #self.delim
    if sub(self.buf, at, at + 1) == "--" then
        self.done = true
        return nil
    end
    local e
    local from = at -- where the search for the blank line resumes
    while true do
        e = find(self.buf, "\r\n\r\n", from, true)
        if e then break end
        if #self.buf - at > MAX_HEADERS then bad("part headers over 8 KiB") end
        local scanned = #self.buf - 2 - at -- bytes after `at` already searched (3 kept for a split)
        if not self:fill() then bad("the body ended inside part headers") end
        at = self.pos + #self.delim -- fill() moved what is left to the front of the buffer
        from = scanned > 0 and at + scanned or at
    end
    if e - at > MAX_HEADERS then bad("part headers over 8 KiB") end
    local block = sub(self.buf, at, e + 1) -- padding CRLF, then header lines each ending in CRLF
    self.pos = e + 4
    local first = find(block, "\r\n", 1, true)
    if not match(sub(block, 1, first - 1), "^[ \t]*$") then bad("a boundary line with text after it") end
    local headers = {}
    for line in block:sub(first + 2):gmatch("(.-)\r\n") do
        local name, colon = match(line, "^([^:%s]+)%s*:()")
        if not name then bad("a malformed part header") end
        headers[lower(name)] = trim(sub(line, colon))
    end
    local cd = headers["content-disposition"]
    if not cd or lower(match(cd, "^%s*([^;%s]*)")) ~= "form-data" then
        bad("a part without Content-Disposition: form-data")
    end
    local p = disposition_params(cd)
    if not p.name then bad("a part without a name") end
    return headers, p
end

-- The next piece of the current part's data, or nil at its end (the reader then sits at the next
-- delimiter).
function reader_mt:data()
    if self.at_delim then return nil end
    local delim = self.delim
    while true do
        local buf, pos = self.buf, self.pos
        local i = find(buf, delim, pos, true)
        if i then
            self.pos = i
            self.at_delim = true
            if i > pos then return sub(buf, pos, i - 1) end
            return nil
        end
        -- keep what could be the start of a delimiter split between two pieces
        local safe = #buf - #delim + 1
        if safe >= pos then
            self.pos = safe + 1
            return sub(buf, pos, safe)
        end
        if not self:fill() then bad("the body ended inside a part") end
    end
end

-- -- Parts ----------------------------------------------------------------------------------------

local part_methods = {}
local part_mt = { __name = "moonlet.multipart.part", __index = part_methods }

-- syntax: piece = part:read() -- the next piece of the part's data; nil at its end
function part_methods:read()
    if self._reader.part ~= self then return nil end -- an earlier part: the reader moved on
    return self._reader:data()
end

-- syntax: data = part:body() -- the rest of the part's data as one string
function part_methods:body()
    local pieces, n = {}, 0
    while true do
        local piece = self:read()
        if not piece then break end
        n = n + 1
        pieces[n] = piece
    end
    return concat(pieces, "", 1, n)
end

-- syntax: for part in multipart.parts(source, boundary) do ... end -- source() returns the body
-- piece by piece, then nil, and raises when the body breaks (req:chunks()). Each part has name,
-- filename (nil for a plain field), type (its Content-Type, nil when none) and headers; a part's
-- data not read when the loop moves on is skipped.
function _M.parts(source, boundary)
    -- The body is read as if it began with CRLF, so that the first boundary, at its very start,
    -- is found like every other one: CRLF "--" boundary.
    local r = setmetatable({ source = source, buf = "\r\n", pos = 1, delim = "\r\n--" .. boundary,
                             done = false, at_delim = false, part = nil }, reader_mt)
    local started = false
    return function()
        if r.done then return nil end
        if not started then -- skip the preamble: up to the first delimiter
            started = true
            while not r.at_delim do r:data() end
        else
            while r:data() do end -- the rest of the current part
        end
        local headers, p = r:next_head()
        if not headers then
            r.part = nil
            return nil
        end
        r.at_delim = false
        local part = setmetatable({ name = p.name, filename = p.filename,
                                    type = headers["content-type"], headers = headers,
                                    _reader = r }, part_mt)
        r.part = part
        return part
    end
end

-- syntax: fields, all = multipart.read_form(source, boundary) -- a whole multipart/form-data body:
-- fields[name] is a string for a plain field and { filename =, type =, headers =, body = } for a
-- file; a name given again keeps its first value there (as url.parse_query does), and all[name]
-- lists every value of it in order (<input type=file multiple>, checkboxes)
function _M.read_form(source, boundary)
    local fields, all, count = {}, {}, 0
    for part in _M.parts(source, boundary) do
        count = count + 1
        if count > MAX_FORM_PARTS then bad("more than " .. MAX_FORM_PARTS .. " parts") end
        local body = part:body()
        local v = body
        if part.filename then
            v = { filename = part.filename, type = part.type, headers = part.headers, body = body }
        end
        local name = part.name
        if fields[name] == nil then
            fields[name] = v
            all[name] = { v }
        else
            local list = all[name]
            list[#list + 1] = v
        end
    end
    return fields, all
end

-- -- Writing ------------------------------------------------------------------------------------

-- A boundary nobody can guess (a file's bytes must not be able to end its part early): 18 bytes of
-- OpenSSL's CSPRNG (moonlet.crypto.random).
local function new_boundary()
    local crypto = require "moonlet.crypto"
    return "moonlet-" .. crypto.hex(crypto.random(18))
end

-- A name or file name inside quotes, as HTML forms write it (" and line breaks percent-encoded),
-- and a backslash as a quoted pair, which params_of (and RFC 2045 readers) take back.
local QUOTED = { ["\\"] = "\\\\", ['"'] = "%22", ["\r"] = "%0D", ["\n"] = "%0A" }
local function quote(s)
    return '"' .. gsub(tostring(s), '[\\"\r\n]', QUOTED) .. '"'
end

local function is_file(v)
    return type(v) == "table" and (v.filename ~= nil or v.body ~= nil)
end

-- syntax: has = multipart.has_file(form) -- whether a form table holds a file, which makes it
-- multipart/form-data for moonlet.http
function _M.has_file(form)
    for _, v in pairs(form) do
        if is_file(v) then return true end
        if type(v) == "table" then -- a list of values under one name (<input type=file multiple>)
            for _, x in ipairs(v) do
                if is_file(x) then return true end
            end
        end
    end
    return false
end

-- syntax: body, content_type = multipart.encode(form) -- form: name -> string (a number, true), an
-- array of them (the name repeated), or a file { filename =, type =, body = }, whose body is a
-- string or a function returning it piece by piece (then nil). The body is a string, or a function
-- that returns the whole body piece by piece when a file body is a function. Names in sorted order.
function _M.encode(form)
    local names = {}
    for k in pairs(form) do names[#names + 1] = tostring(k) end
    sort(names)
    local boundary = new_boundary()
    local items, n, streamed = {}, 0, false -- strings, and file body functions in their places
    local function part(name, v)
        local head = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=" .. quote(name)
        local body = v
        if is_file(v) then
            if v.filename ~= nil then head = head .. "; filename=" .. quote(v.filename) end
            head = head .. "\r\nContent-Type: " .. (v.type or "application/octet-stream")
            body = v.body or ""
        elseif v == true then
            body = ""
        end
        local bt = type(body)
        if bt == "function" and body ~= v then -- a file's body, made piece by piece
            streamed = true
        elseif bt ~= "string" and bt ~= "number" then
            error("moonlet.http: form field " .. name .. ": a string, a number or a file table", 0)
        end
        if bt == "number" then body = tostring(body) end
        items[n + 1], items[n + 2], items[n + 3] = head .. "\r\n\r\n", body, "\r\n"
        n = n + 3
    end
    for _, name in ipairs(names) do
        local v = form[name]
        if v == nil then v = form[tonumber(name)] end
        if type(v) == "table" and not is_file(v) then
            for _, x in ipairs(v) do part(name, x) end
        elseif v ~= false then
            part(name, v)
        end
    end
    n = n + 1
    items[n] = "--" .. boundary .. "--\r\n"
    local ctype = "multipart/form-data; boundary=" .. boundary
    if not streamed then return concat(items, "", 1, n), ctype end
    local i, inner = 0, nil
    return function()
        while true do
            if inner then
                local piece = inner()
                if piece ~= nil then return piece end
                inner = nil
            end
            i = i + 1
            if i > n then return nil end
            local item = items[i]
            if type(item) == "function" then inner = item else return item end
        end
    end, ctype
end

return _M
