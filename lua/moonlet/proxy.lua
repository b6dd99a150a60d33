-- lua/moonlet/proxy.lua: moonlet.proxy, a reverse-proxy handler (nginx's proxy_pass) built on the
-- HTTP client (lua/moonlet/http_client.lua):
--
--   app:any("/api/*path", moonlet.proxy({ upstream = "http://127.0.0.1:9000", strip_prefix = "/api" }))
--
-- Each request is sent on to the upstream as it comes (same method, the raw path and query, the
-- end-to-end headers plus X-Forwarded-*, the body piece by piece while the client sends it), and
-- the upstream's answer comes back the same way: status and end-to-end headers, then the body one
-- piece at a time through res:write, never held whole. Hop-by-hop headers (RFC 9110 7.6.1) stay on
-- their own connection, both ways; the server frames the response itself (response.lua).
--
-- A WebSocket opening handshake (GET, Upgrade: websocket) is not sent on as HTTP: the proxy opens
-- a WebSocket of its own to the upstream (ws:// or wss://, same path and query, the client's
-- end-to-end headers and subprotocols) with moonlet.ws.connect, and only when that succeeds
-- accepts the client's (with the subprotocol the upstream chose; an upstream that answers other
-- than 101 has that answer, status, headers and body, passed on as any other); then two relays
-- pass messages on, one per direction (this handler's task, client to upstream, and a task it
-- spawns). Each leg is a WebSocket of its own: pings, fragments, limits and the close handshake
-- are its own; what crosses is whole messages and the close code and reason.
--
-- Any other Upgrade (Connection: Upgrade, Upgrade: foo/1; an HTTP/1.1 request without a body) is
-- sent on with its Upgrade through the HTTP client; an answer other than 101 comes back as any
-- other, a 101 goes to the client (ws.accept_raw takes its connection over as a byte stream) and
-- the bytes are relayed both ways until either side closes, or neither carried a byte for timeout
-- seconds (nginx's upgrade tunnel).
--
-- An https:// upstream is checked against tls.cafile (or the system's CAs); tls.cert and tls.key
-- present a client certificate to it (nginx's proxy_ssl_certificate), on both kinds of legs.
--
-- Several upstreams (upstream = { url, url, ... }, nginx's upstream block with its defaults) take
-- the requests in turn (round robin). One that fails (no connection, an error or a timeout before
-- its answer began) max_fails times within fail_timeout seconds is left out for fail_timeout
-- seconds, and the request goes on to the next one when that is safe (nginx's proxy_next_upstream
-- error timeout): a request whose body has not begun to go, and, for a method that is not
-- idempotent, only when no connection was made (so the upstream saw nothing). With none left:
-- 502, "no live upstreams". The peers' state is the handler's own (per process, per handler).
--
-- An answer's Location, Content-Location and Refresh under the upstream's URL are rewritten to
-- the client's view of it (nginx's proxy_redirect default), Set-Cookie's Domain= and Path= only
-- when asked (proxy_cookie_domain, proxy_cookie_path): lua/moonlet/proxy_rewrite.lua.
--
-- Ownership: the upstream response (stream = true) holds a pooled connection until its body has
-- been read to the end or it is closed. Every way out of the handler closes it: the end of the
-- body (it goes back to the pool), a client that went away (write fails: closed here), and a
-- cancellation anywhere (the HTTP client closes it where it waits; a cancellation while this
-- handler waits on the client's socket is caught below, the response closed, and re-raised).
local core = require "moonlet.core"
local http = require "moonlet.http_client"
local abort = require("moonlet.response").abort
local ws = require "moonlet.ws"
local task = require "moonlet.task"
local lift_deadline = require("moonlet.app").lift_deadline
local rewrite = require "moonlet.proxy_rewrite"
local tls_failure = require("moonlet.tcp").tls_failure

local lower, find, sub, match, gmatch = string.lower, string.find, string.sub, string.match,
    string.gmatch
local type, pairs, tostring, tonumber, pcall, error, rawget = type, pairs, tostring, tonumber, pcall,
    error, rawget
local concat = table.concat

local _M = {}

-- Never forwarded, either way (RFC 9110 7.6.1; Proxy-* by prefix, below). Expect is answered by
-- this server itself (100 Continue when the body is first read), so it is not passed on either.
local HOP = {
    connection = true, ["keep-alive"] = true, te = true, trailer = true,
    ["transfer-encoding"] = true, upgrade = true, expect = true,
}

-- Response headers this server writes itself (nginx's proxy_hide_header defaults: Date, Server);
-- Content-Length is handled apart (it sizes the stream when it is known).
local OWN_RESPONSE = { date = true, server = true, ["content-length"] = true }

local OPTIONS = { upstream = true, strip_prefix = true, timeout = true, headers = true,
                  preserve_host = true, websocket = true, redirect = true, cookie_domain = true,
                  cookie_path = true, tls = true, real_ip = true, max_fails = true,
                  fail_timeout = true, next_upstream = true, upgrade = true }

-- Methods a request of which may be sent again to the next upstream after any failure before the
-- answer (RFC 9110 9.2.2); the others only when no connection was made.
local IDEMPOTENT = { GET = true, HEAD = true, OPTIONS = true, TRACE = true, PUT = true,
                     DELETE = true }

-- The errors of a request that never reached an upstream (its connection was not made).
local NOT_CONNECTED = { ["connection refused"] = true, ["not found"] = true,
                        ["network unreachable"] = true, ["host unreachable"] = true }

-- The options of `tls = { ... }`, for an https:// upstream (both the HTTP client's and ws.connect's).
-- cert and key: a client certificate (nginx's proxy_ssl_certificate, proxy_ssl_certificate_key;
-- cert alone: a PEM file that holds both).
local TLS_OPTIONS = { cafile = "string", server_name = "string", verify = "boolean", cert = "string",
                      key = "string" }

-- The response headers proxy_rewrite.redirect reads.
local REDIRECT_HEADERS = { location = true, ["content-location"] = true, refresh = true }

-- The options of `websocket = { ... }`, given to both legs (docs/websocket.md).
local WS_OPTIONS = { max_message = true, ping_interval = true, idle_timeout = true,
                     close_timeout = true }

-- Request headers each WebSocket leg negotiates itself (subprotocols are offered apart).
local WS_OWN = { ["sec-websocket-key"] = true, ["sec-websocket-version"] = true,
                 ["sec-websocket-extensions"] = true, ["sec-websocket-protocol"] = true,
                 ["sec-websocket-accept"] = true }

-- The close codes a peer can be told (others only describe what happened: 1005 no code, 1006 a
-- drop, 1015 a TLS failure).
local function sendable(code)
    return code and ((code >= 1000 and code <= 1003) or (code >= 1007 and code <= 1014)
        or (code >= 3000 and code <= 4999))
end

local function log_error(msg) core.log(0, msg) end

-- The lower-case names a Connection header lists (they are hop-by-hop too), or nil. The sets are
-- kept by value (bounded, read only): an upstream's "keep-alive" on every response is split once.
local tokens_cache, tokens_count = {}, 0
local function connection_tokens(value)
    if not value then return nil end
    local t = tokens_cache[value]
    if t then return t end
    t = {}
    for tok in gmatch(value, "[^,%s]+") do t[lower(tok)] = true end
    if tokens_count >= 64 then tokens_cache, tokens_count = {}, 0 end
    tokens_count = tokens_count + 1
    tokens_cache[value] = t
    return t
end

local function hop_by_hop(name, listed)
    return HOP[name] or find(name, "proxy-", 1, true) == 1 or (listed and listed[name]) or false
end

-- The address of a peer "host:port" ("[v6]:port"), without the port; kept by peer (bounded): a
-- keep-alive connection's requests all come from the same one.
local addr_cache, addr_count = {}, 0
local function peer_addr(peer)
    local addr = addr_cache[peer]
    if addr then return addr end
    addr = match(peer, "^%[(.*)%]:%d+$") or match(peer, "^(.*):%d+$") or peer
    if addr_count >= 1024 then addr_cache, addr_count = {}, 0 end
    addr_count = addr_count + 1
    addr_cache[peer] = addr
    return addr
end

-- The raw path of the request (percent-encoding as the client sent it, so an encoded "/" stays
-- one), without the query: req.target may be absolute-form ("http://host/p?q").
local function raw_path(req)
    local target = req.target
    local q = find(target, "[?#]")
    local path = q and sub(target, 1, q - 1) or target
    if sub(path, 1, 1) ~= "/" then path = match(path, "^%a[%w+.-]*://[^/]*(/.*)$") or "/" end
    return path
end

-- The request headers for the upstream: the client's end-to-end ones (out: those already, made by
-- x:forward_headers; else taken from req.headers here), Host (the upstream's unless preserve_host),
-- X-Forwarded-For with the address this connection came from appended, X-Forwarded-Proto and
-- -Host, then the options' headers (false removes one).
local function upstream_headers(req, p, out)
    if not out then
        out = {}
        local h = req.headers
        local listed = connection_tokens(h.connection)
        for name, value in pairs(h) do
            if name ~= "host" and not hop_by_hop(name, listed) then out[name] = value end
        end
    end
    -- req.peer and req.scheme as reading them gives them, but from one x:info() call when they
    -- are not in req yet, not through request.lua's lazy fields: those set five more fields in
    -- req, which then grows its table (callgrind, GET /p/b of examples/bench_proxy.lua: 46.1k ->
    -- 44.0k instructions a request). (Reading req.peer fills req.scheme too, from the exchange:
    -- the same here.)
    local peer, scheme = rawget(req, "peer"), rawget(req, "scheme")
    if peer == nil or scheme == nil then
        local version, _, xpeer, _, xscheme = req._x:info()
        if version == nil then xpeer, xscheme = false, false end -- (the connection is gone)
        if peer == nil then peer, scheme = xpeer, xscheme else scheme = xscheme end
    end
    local addr = peer and peer_addr(peer)
    if addr then
        local xff = out["x-forwarded-for"]
        out["x-forwarded-for"] = xff and xff .. ", " .. addr or addr
    end
    out["x-forwarded-proto"] = scheme or nil
    out["x-forwarded-host"] = req.host
    if p.real_ip then out["x-real-ip"] = req.ip end -- (nginx's $remote_addr: under moonlet.forwarded,
                                                      -- the client's)
    if p.preserve_host then out.host = req.host end
    local extra = p.headers
    if extra then
        for name, value in pairs(extra) do
            local l = lower(name)
            for k in pairs(out) do
                if lower(k) == l then out[k] = nil end
            end
            if value ~= false then out[name] = value end
        end
    end
    return out
end

-- A response header's value as the client gets it (see the top of the file); peer: the upstream
-- that answered; prefix: the part of the client's path that strip_prefix took off ("" when none).
local function rewritten(p, peer, req, prefix, name, value)
    if REDIRECT_HEADERS[name] and p.redirect then
        local host = req.host
        local client = host and (req.scheme or "http") .. "://" .. host .. prefix or prefix
        return rewrite.redirect(name, value, peer.up, client, p.redirect ~= "default" and p.redirect or nil)
    elseif name == "set-cookie" and (p.cookie_domain or p.cookie_path) then
        return rewrite.cookies(value, p.cookie_domain, p.cookie_path)
    end
    return value
end

-- Copies the upstream response's end-to-end headers onto res; returns its Content-Length (a
-- number) when the body's size is known and framed by it alone.
local function copy_headers(p, peer, req, prefix, up, res)
    local h = up.headers
    local listed = connection_tokens(h.connection)
    for name, value in pairs(h) do
        if not hop_by_hop(name, listed) and not OWN_RESPONSE[name] then
            res:header(name, rewritten(p, peer, req, prefix, name, value))
        end
    end
    if h["transfer-encoding"] then return nil end
    local cl = h["content-length"]
    return cl and tonumber(cl) or nil
end

local core_running, core_now = core.running, core.now

-- The body, piece by piece from the upstream to the client: nil at its end, or when the client
-- went away (the upstream's connection is then closed); the error when the upstream broke off.
-- It runs under the handler's pcall, and a JIT trace that begins inside it (where it waited, or at
-- a hot function of the HTTP client it calls) cannot be recorded through the return to that pcall
-- ("NYI: return to lower frame"): LuaJIT threw each such trace away, and the upstream's last read
-- (its connection pooled) ran in the interpreter. So pump ends the trace with a C call just before
-- it returns (as moonlet.task's wrappers do, lua/moonlet/task.lua): only the return is left to
-- the interpreter (callgrind, GET /p/b of examples/bench_proxy.lua under wrk -c64: 78.6k -> 71.1k
-- instructions a request).
local function pump(up, res, first)
    local ok = res:write(first)
    while ok do
        local piece, err = up:read()
        if not piece then
            core_running() -- (ends the trace, above)
            return err
        end
        ok = res:write(piece)
    end
    up:close() -- the client is gone: so is the upstream's connection
    core_running()
end

-- What the error log names a request by: "moonlet.proxy: GET /api/x -> http://127.0.0.1:9000" (made
-- only when there is something to log); peer: the upstream tried (nil when none was).
local function what(peer, req)
    return "moonlet.proxy: " .. req.method .. " " .. req.target .. " -> " .. (peer and peer.upstream or "")
end

-- The answer when the upstream could not be reached or did not answer: 504 for a timeout, else
-- 502 (nginx's), with a line in the error log naming the upstream (and the file of tls that did
-- not load: "tls: cannot load certificate (client.pem)"); peer: the upstream tried (nil: none was).
local function fail(p, peer, req, res, err)
    log_error(what(peer, req) .. ": " .. tls_failure(err, p.tls))
    res:type("text")
    if err == "timeout" or err == "response body: timeout" then
        res:status(504)
        return "504 Gateway Timeout\n"
    end
    res:status(502)
    return "502 Bad Gateway\n"
end

-- -- Upstreams ---------------------------------------------------------------------------------
-- p.peers: { upstream =, base =, ws_base =, up =, fails =, checked =, down_until = } each, taken in
-- turn from p.rr. A peer is left out until down_until once it failed max_fails times with no more
-- than fail_timeout seconds between one failure and the next; a success forgets its failures. A
-- single upstream is never left out (nginx ignores max_fails for a lone server).

-- The next peer in turn that is not left out at time t nor in tried (the peers this request tried
-- already: p.rr is every request's, and others take turns while one waits on a peer), or nil when
-- every one is.
local function pick(p, t, tried)
    local peers, n = p.peers, p.npeers
    if n == 1 then return peers[1] end
    for _ = 1, n do
        local i = p.rr % n + 1
        p.rr = i
        local peer = peers[i]
        if peer.down_until <= t and not (tried and tried[peer]) then return peer end
    end
    return nil
end

local function failed(p, peer, t)
    if p.npeers == 1 or p.max_fails == 0 then return end
    if t - peer.checked > p.fail_timeout then peer.fails = 0 end
    peer.fails = peer.fails + 1
    peer.checked = t
    if peer.fails >= p.max_fails then peer.down_until = t + p.fail_timeout end
end

local function succeeded(peer)
    if peer.fails > 0 then peer.fails = 0 end
end

-- May a request that failed with err (before any answer) go on to the next upstream? started: its
-- body began to go (a body is read once: it cannot be sent again).
local function next_ok(p, method, err, started)
    return p.next_upstream and not started and (IDEMPOTENT[method] or NOT_CONNECTED[err] or false)
end

-- The upstream's answer (stream = true) to the request sent to peer.base .. suffix: up, or nil, err.
local function send(p, peer, method, suffix, headers, body)
    local t = p.timeout
    return http.request({
        method = method, url = peer.base .. suffix, headers = headers, body = body, stream = true,
        user_agent = false, connect_timeout = t, send_timeout = t, read_timeout = t,
        tls = p.http_tls, verify = p.tls.verify,
    })
end

-- Opens the request on the upstreams in turn, each at most once (nginx's proxy_next_upstream):
-- open(peer) returns up (and what comes with it), nil, err (a failure: the peer is counted failed,
-- and the next one tried when next_ok allows; started(), when given, tells whether the body began
-- to go) or nil, err, answer (the upstream answered, a refusal: no failure, no next). Returns up,
-- err, peer, answer; peer is the last one tried (nil, with "no live upstreams", when none was).
local function from_peers(p, req, method, open, started)
    local up, err, answer, peer, tried
    for _ = 1, p.npeers do
        local cand = pick(p, core_now(), tried)
        if not cand then break end
        peer = cand
        up, err, answer = open(peer)
        if up then
            succeeded(peer)
            break
        end
        if answer then break end
        failed(p, peer, core_now())
        if p.npeers == 1 or not next_ok(p, method, err, started and started()) then break end
        tried = tried or {}
        tried[peer] = true
        log_error(what(peer, req) .. ": " .. tostring(err) .. " (trying the next upstream)")
    end
    if not peer then err = "no live upstreams" end
    return up, err, peer, answer
end

-- With several upstreams: the answer of the first that gives one (from_peers); up, nil, peer or
-- nil, err, peer.
local function send_next(p, req, method, suffix, headers, body)
    local started = false
    local b = body and function()
        started = true
        return body()
    end
    return from_peers(p, req, method, function(peer) return send(p, peer, method, suffix, headers, b) end,
                      function() return started end)
end

-- The upstream's answer to the request: up, nil, peer or nil, err, peer (send_next's).
local function request_upstream(p, req, method, suffix, headers, body)
    if p.npeers == 1 then -- (no loop on the usual path: LuaJIT's trace of the request goes on)
        local peer = p.peers[1]
        local up, err = send(p, peer, method, suffix, headers, body)
        return up, err, peer
    end
    return send_next(p, req, method, suffix, headers, body)
end

-- Passes the messages of `from` on to `to`, each as it came (text or binary), waiting on each send
-- before the next receive (the backpressure of ws:send), until `from` has closed: `to` is then
-- closed with its code and reason (no code: a close frame without one; a drop: `gone` and
-- `why`). When a send fails `to` is closed already: its own relay passes its close on to `from`.
local function relay(from, to, gone, why)
    while true do
        local msg, kind = from:receive()
        if msg == nil then break end
        if not to:send(msg, kind) then return end
    end
    local code, reason = from.close_code, from.close_reason
    if code == 1005 then
        to:close(1005)
    elseif sendable(code) then
        to:close(code, reason)
    else
        to:close(gone, why)
    end
end

-- The spawned relay's body: a cancellation (the handler's, below) ends it quietly.
local function relay_task(from, to, gone, why)
    local ok, err = pcall(relay, from, to, gone, why)
    if not ok and err ~= task.CANCELLED then error(err, 0) end
end

-- The headers of the upstream's 101 for the client's: its end-to-end ones (a Set-Cookie), rewritten
-- as an HTTP answer's are, but the handshake's own (each leg makes its own) and Date and Server.
-- A name that is not a token or a value with a control character but "\n" (between Set-Cookie
-- lines) is dropped: ws.accept would raise on it with the upstream leg open.
local function ws_headers_back(p, peer, req, prefix, h)
    local out = {}
    local listed = connection_tokens(h.connection)
    for name, value in pairs(h) do
        if not hop_by_hop(name, listed) and not OWN_RESPONSE[name] and sub(name, 1, 14) ~= "sec-websocket-"
           and match(name, "^[%w!#$%%&'*+.^_`|~-]+$") and not find(value, "[%z\1-\8\11-\31\127]") then
            out[name] = rewritten(p, peer, req, prefix, name, value)
        end
    end
    return out
end

-- A WebSocket handshake: the upstream leg first (502/504 when it cannot be had, the upstream's
-- answer, headers and body, when it refused the handshake; with several upstreams, the next one
-- after a failure), then the client's, then the relays. suffix: the path and query after the
-- upstream's.
local function handle_ws(p, req, res, suffix, prefix)
    local status, body, refused = ws.refusal(req)
    if status then return status, body, refused end
    local headers = upstream_headers(req, p)
    for name in pairs(headers) do
        if WS_OWN[lower(name)] then headers[name] = nil end
    end
    local offered = {}
    for proto in gmatch(req.headers["sec-websocket-protocol"] or "", "[^,%s]+") do
        offered[#offered + 1] = proto
    end
    local o = p.websocket
    local tls = p.tls
    local wo = {
        cafile = tls.cafile, server_name = tls.server_name, verify = tls.verify, cert = tls.cert,
        key = tls.key, timeout = p.timeout,
        headers = headers, protocols = offered, max_message = o.max_message,
        ping_interval = o.ping_interval, idle_timeout = o.idle_timeout, close_timeout = o.close_timeout,
    }
    -- (err: the 101's headers when up; answer: the upstream's refusal of the handshake)
    local up, err, peer, answer = from_peers(p, req, "GET",
        function(peer) return ws.connect(peer.ws_base .. suffix, wo) end)
    if not peer then return fail(p, nil, req, res, err) end
    if not up then
        if not answer then return fail(p, peer, req, res, err) end
        -- the upstream said no (401, 403, 404, a redirect): its answer goes to the client as any
        -- other response of it would, and the client's handshake is not accepted
        res:status(answer.status)
        copy_headers(p, peer, req, prefix, answer, res)
        return answer.body
    end
    local chosen = up.protocol
    local down, st, b, h = ws.accept(req, {
        protocols = function() return chosen end, headers = ws_headers_back(p, peer, req, prefix, err),
        max_message = o.max_message,
        ping_interval = o.ping_interval, idle_timeout = o.idle_timeout,
        close_timeout = o.close_timeout,
    })
    if not down then
        up:close(1001, "going away")
        return st, b, h
    end
    res._on_send = false -- the 101 went out without the app's headers, as for app:websocket
    lift_deadline(res) -- a session outlives any request deadline
    -- a client that drops is "going away"; an upstream that drops is the proxy's 1014 (Bad
    -- Gateway: the WebSocket counterpart of 502)
    local back = task.spawn(relay_task, up, down, 1014, "bad gateway")
    local ok, e = pcall(function()
        relay(down, up, 1001, "going away")
        back:join()
    end)
    if not ok then -- cancelled (server shutdown): both legs close, the other relay ends
        down:close(1001, "going away")
        up:close(1001, "going away")
        back:cancel()
        error(e, 0)
    end
end

-- The upstream's response up (streamed) from peer to the client: status, end-to-end headers, then
-- the body piece by piece.
local function pass_on(p, peer, req, res, prefix, up)
    local method = req.method
    local first, err -- (read before the head is copied: a body that fails at once is a 502 of its own)
    if method ~= "HEAD" then
        first, err = up:read()
        if err then return fail(p, peer, req, res, "response body: " .. err) end
    end
    res:status(up.status)
    local length = copy_headers(p, peer, req, prefix, up, res)
    if method == "HEAD" then -- no body; the upstream's length tells what a GET would get
        if length then res:header("Content-Length", length) end
        return ""
    end
    if not first then return "" end -- no body (204, 304, or empty)
    if length == #first then return first end -- all of it in one piece: one response, no stream
    if length then res:header("Content-Length", length) end
    local ok, e = pcall(pump, up, res, first)
    if not ok then
        up:close() -- cancelled while it waited on the client: the upstream's connection goes too
        error(e, 0)
    end
    if e then -- the upstream broke off mid-body: a stream left unfinished is closed by the server
        log_error(what(peer, req) .. ": response body: " .. e) -- (not ended as if whole); an abort raised
        error(abort(502), 0)                          -- once streaming is not logged again
    end
end

-- The bytes of the upstream's side of a tunnel on to the client, until either ends; then the
-- client's connection is closed (once what was written to it is out). up's reads wait without a
-- limit (handle_upgrade watches the tunnel's idleness); live.last is when a byte last went either
-- way, set here after each read and each send.
local function tunnel_back(up, down, live)
    while true do
        local data = up:read()
        if not data then break end
        live.last = core_now()
        if not down:send(data, "binary") then break end
        live.last = core_now()
    end
    down:close()
end

-- The spawned half of a tunnel: a cancellation (the handler's, below) ends it quietly.
local function tunnel_task(up, down, live)
    local ok, err = pcall(tunnel_back, up, down, live)
    if not ok and err ~= task.CANCELLED then error(err, 0) end
end

-- The client's side of a tunnel on to the upstream (in the handler's task), until either ends or
-- neither direction carried a byte for t seconds: each wait on the client is bounded by what is
-- left of t since live.last, and a wait that times out ends the tunnel only when the other
-- direction did not move meanwhile (nginx re-arms proxy_read_timeout on any event of an upgraded
-- connection, ngx_http_upstream_process_upgraded). A send to the upstream is bounded by its own
-- timeout (nginx's proxy_send_timeout): one that times out closes up, which ends the other half.
-- t: nil, no limit (a read_timeout of 0).
local function tunnel_forth(up, down, live, t)
    while true do
        local left
        if t then
            left = live.last + t - core_now()
            if left < 0.001 then left = 0.001 end -- (a wait that yields: never a busy loop)
        end
        local data, err = down:receive(left)
        if data then
            live.last = core_now()
            if not up:send(data) then return end
            live.last = core_now()
        elseif err ~= "timeout" or core_now() - live.last >= t then
            return
        end
    end
end

-- The 101's header lines for the client: the upstream's Upgrade, then its end-to-end headers as
-- for any answer (ws_headers_back's checks: a name that is not a token or a value with a control
-- character is dropped).
local function upgrade_lines(p, peer, req, prefix, h, upgrade)
    local out = { "Upgrade: ", h.upgrade or upgrade, "\r\nConnection: Upgrade\r\n" }
    local listed = connection_tokens(h.connection)
    for name, value in pairs(h) do
        if not hop_by_hop(name, listed) and not OWN_RESPONSE[name]
           and match(name, "^[%w!#$%%&'*+.^_`|~-]+$") and not find(value, "[%z\1-\8\11-\31\127]") then
            for line in gmatch(rewritten(p, peer, req, prefix, name, value), "[^\n]+") do
                out[#out + 1] = name .. ": " .. line .. "\r\n"
            end
        end
    end
    if find(out[2], "[%c]") then return nil end
    return concat(out)
end

-- An Upgrade to another protocol than WebSocket (nginx's upgrade tunnel): the request goes on
-- with its Upgrade; an answer other than 101 comes back as any other; a 101 is passed on and the
-- bytes then go both ways as they come, client to upstream in this handler's task and upstream to
-- client in one it spawns, until either side closes, or neither direction carried a byte for
-- timeout seconds (nginx's proxy_read_timeout on an upgraded connection: any traffic, either way,
-- keeps the tunnel open), or a send to the upstream waited timeout seconds (proxy_send_timeout);
-- then both connections close and both tasks end. The handler's task watches the idleness (its
-- waits on the client are bounded by it, tunnel_forth): no timer or task of its own.
local function handle_upgrade(p, req, res, suffix, prefix, upgrade)
    local headers = upstream_headers(req, p)
    headers.Upgrade, headers.Connection = upgrade, "Upgrade" -- (hop-by-hop: asked for again)
    local up, err, peer = request_upstream(p, req, req.method, suffix, headers, nil)
    if not up then return fail(p, peer, req, res, err) end
    if up.status ~= 101 then return pass_on(p, peer, req, res, prefix, up) end
    local lines = upgrade_lines(p, peer, req, prefix, up.headers, upgrade)
    local down = lines and ws.accept_raw(req, lines)
    if not down then
        up:close()
        return fail(p, peer, req, res, lines and "the client's connection could not be upgraded"
                                       or "bad Upgrade in the upstream's 101")
    end
    res._on_send = false -- the 101 went out without the app's headers, as for app:websocket
    lift_deadline(res) -- a tunnel outlives any request deadline
    local _, t = up:settimeouts(nil, 0) -- (the 101's reads: the idle watch of tunnel_forth)
    local live = { last = core_now() }
    local back = task.spawn(tunnel_task, up, down, live)
    local ok, e = pcall(tunnel_forth, up, down, live, t and t > 0 and t or nil)
    back:cancel() -- (false when it has ended: the upstream closed first)
    up:close()
    down:close()
    if not ok then error(e, 0) end -- cancelled (server shutdown, the client gone)
    back:join()
end

local function handle(p, req, res)
    local x = res._x
    if x then x:cancel_on_hangup() end -- the client's FIN cancels the fetch (nginx's default)
    local path = raw_path(req)
    local strip, prefix = p.strip_prefix, ""
    if strip and sub(path, 1, #strip) == strip then
        local c = sub(path, #strip + 1, #strip + 1)
        if c == "" or c == "/" then
            path, prefix = sub(path, #strip + 1), strip
            if path == "" then path = "/" end
        end
    end
    local qs = req.query_string
    local suffix = qs and path .. "?" .. qs or path
    local method = req.method
    -- the client's end-to-end headers: made in C (x:forward_headers) from the request as it came,
    -- unless req.headers was made (a middleware may have changed it): a Lua loop over it aborted
    -- the JIT trace of every request (callgrind, GET /p/b of examples/bench_proxy.lua: 50.0k ->
    -- 46.6k instructions a request)
    local fwd, upgrade, te, cl
    if x and rawget(req, "headers") == nil then fwd, upgrade, te, cl = x:forward_headers() end
    if not fwd then
        local rh = req.headers
        upgrade, te, cl = rh.upgrade, rh["transfer-encoding"], rh["content-length"]
    end
    cl = tonumber(cl)
    if upgrade then
        if find(lower(upgrade), "websocket", 1, true) then
            if p.websocket and method == "GET" then
                return handle_ws(p, req, res, suffix, prefix)
            end
        elseif p.upgrade and not te and (cl or 0) == 0
               and (connection_tokens(req.headers.connection) or {}).upgrade
               and (not x or x:info() == "1.1") then
            return handle_upgrade(p, req, res, suffix, prefix, upgrade)
        end
    end
    local headers = upstream_headers(req, p, fwd)
    local body
    if (cl and cl > 0) or te then body = req:chunks() end
    local up, err, peer = request_upstream(p, req, method, suffix, headers, body)
    if not up then return fail(p, peer, req, res, err) end
    return pass_on(p, peer, req, res, prefix, up)
end

-- syntax: handler = proxy.handler(upstream_url | { upstream = url | { url, ... }, max_fails = 1,
-- fail_timeout = 10, next_upstream = true, strip_prefix =, timeout =,
-- headers =, preserve_host =, websocket = true | false | { max_message =, ping_interval =,
-- idle_timeout =, close_timeout = }, redirect = true | false | { [from] = to },
-- cookie_domain = { [from] = to }, cookie_path = { [from] = to }, tls = { cafile =, verify =,
-- server_name =, cert =, key = }, real_ip = false, upgrade = true }) -- raises on a bad option; a
-- cert or key file that does not load is a 502 of each request, logged with the file's name (as a
-- cafile's); upgrade = false sends an Upgrade other than WebSocket on as plain HTTP without it
function _M.handler(opts)
    if type(opts) == "string" then opts = { upstream = opts } end
    if type(opts) ~= "table" then
        error("moonlet.proxy: expected an upstream URL or a table of options", 2)
    end
    for k in pairs(opts) do
        if not OPTIONS[k] then error("moonlet.proxy: unknown option " .. tostring(k), 2) end
    end
    local upstreams = opts.upstream
    if type(upstreams) ~= "table" then upstreams = { upstreams } end
    if upstreams[1] == nil then error("moonlet.proxy: upstream must list at least one URL", 2) end
    local peers, n = {}, 0
    for k, upstream in pairs(upstreams) do
        n = n + 1
        if type(k) ~= "number" then error("moonlet.proxy: upstream must be a URL or a list of URLs", 2) end
        if type(upstream) ~= "string" or not match(upstream, "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]+[^?#]*$") then
            error("moonlet.proxy: upstream must be an http:// or https:// URL without a query", 2)
        end
        if not http.parse_url(upstream) then error("moonlet.proxy: bad upstream URL " .. upstream, 2) end
        local base = match(upstream, "^(.-)/*$")
        peers[k] = { upstream = upstream, base = base, up = rewrite.upstream(base),
                     ws_base = "ws" .. sub(base, 5), -- http://h → ws://h, https://h → wss://h
                     fails = 0, checked = 0, down_until = 0 }
    end
    for i = 1, n do -- (a list: keys 1 to n, no hole)
        if not peers[i] then error("moonlet.proxy: upstream must be a URL or a list of URLs", 2) end
    end
    local max_fails, fail_timeout = opts.max_fails or 1, opts.fail_timeout or 10
    if type(max_fails) ~= "number" or max_fails < 0 or max_fails % 1 ~= 0 then
        error("moonlet.proxy: max_fails must be a whole number, 0 or more", 2)
    end
    if type(fail_timeout) ~= "number" or fail_timeout ~= fail_timeout or fail_timeout <= 0 then
        error("moonlet.proxy: fail_timeout must be a number of seconds above 0", 2)
    end
    local strip = opts.strip_prefix
    if strip ~= nil and (type(strip) ~= "string" or sub(strip, 1, 1) ~= "/") then
        error("moonlet.proxy: strip_prefix must be a path starting with /", 2)
    end
    if strip then strip = match(strip, "^(.-)/*$") end -- "/api/" strips as "/api"
    local t = opts.timeout
    if t ~= nil and (type(t) ~= "number" or t ~= t or t <= 0) then
        error("moonlet.proxy: timeout must be a number of seconds above 0", 2)
    end
    if opts.headers ~= nil and type(opts.headers) ~= "table" then
        error("moonlet.proxy: headers must be a table", 2)
    end
    local wso = opts.websocket
    if wso == nil or wso == true then wso = {} end
    if wso ~= false and type(wso) ~= "table" then
        error("moonlet.proxy: websocket must be true, false or a table of options", 2)
    end
    for k, v in pairs(wso or {}) do
        if not WS_OPTIONS[k] then error("moonlet.proxy: unknown websocket option " .. tostring(k), 2) end
        if type(v) ~= "number" then error("moonlet.proxy: websocket option " .. k .. " is a number", 2) end
    end
    local redirect = opts.redirect
    if redirect == nil or redirect == true then
        redirect = "default"
    elseif redirect ~= false then
        redirect = rewrite.check_map(redirect, "redirect")
    end
    local cdomain, cpath = opts.cookie_domain, opts.cookie_path
    if cdomain ~= nil then cdomain = rewrite.check_map(cdomain, "cookie_domain") end
    if cpath ~= nil then cpath = rewrite.check_map(cpath, "cookie_path") end
    local tls = opts.tls or {}
    if type(tls) ~= "table" then error("moonlet.proxy: tls must be a table", 2) end
    for k, v in pairs(tls) do
        if not TLS_OPTIONS[k] then error("moonlet.proxy: unknown tls option " .. tostring(k), 2) end
        if type(v) ~= TLS_OPTIONS[k] then
            error("moonlet.proxy: tls option " .. k .. " is a " .. TLS_OPTIONS[k], 2)
        end
    end
    if tls.key and not tls.cert then error("moonlet.proxy: tls option key needs cert", 2) end
    if opts.upgrade ~= nil and type(opts.upgrade) ~= "boolean" then
        error("moonlet.proxy: upgrade must be true or false", 2)
    end
    local p = {
        peers = peers, npeers = #peers, rr = 0, max_fails = max_fails, fail_timeout = fail_timeout,
        next_upstream = opts.next_upstream ~= false, strip_prefix = strip ~= "" and strip or nil,
        timeout = t, headers = opts.headers, preserve_host = opts.preserve_host and true or false,
        websocket = wso, redirect = redirect, cookie_domain = cdomain, cookie_path = cpath,
        tls = tls, http_tls = { cafile = tls.cafile, server_name = tls.server_name, cert = tls.cert,
                              key = tls.key },
        real_ip = opts.real_ip and true or false, upgrade = opts.upgrade ~= false,
    }
    return function(req, res) return handle(p, req, res) end
end

return _M
