-- lua/moonlet/mime.lua: media types by file extension, for static files.
local _M = {}

local types = {
    html = "text/html; charset=utf-8", htm = "text/html; charset=utf-8",
    css = "text/css; charset=utf-8", js = "application/javascript; charset=utf-8",
    mjs = "application/javascript; charset=utf-8", json = "application/json",
    txt = "text/plain; charset=utf-8", md = "text/markdown; charset=utf-8",
    csv = "text/csv; charset=utf-8", xml = "application/xml", svg = "image/svg+xml",
    png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
    webp = "image/webp", ico = "image/x-icon", avif = "image/avif",
    woff = "font/woff", woff2 = "font/woff2", ttf = "font/ttf", otf = "font/otf",
    wasm = "application/wasm", pdf = "application/pdf", zip = "application/zip",
    gz = "application/gzip", tar = "application/x-tar", mp3 = "audio/mpeg", ogg = "audio/ogg",
    wav = "audio/wav", mp4 = "video/mp4", webm = "video/webm", lua = "text/plain; charset=utf-8",
}

-- syntax: type = mime.for_path(path) -- application/octet-stream when unknown
function _M.for_path(path)
    local ext = path:match("%.([%w]+)$")
    return ext and types[ext:lower()] or "application/octet-stream"
end

return _M
