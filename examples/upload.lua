-- examples/upload.lua: file uploads (an HTML form, multipart/form-data). GET / serves the form;
-- POST /upload reads it part by part as it arrives (req:parts()) and writes each file to the upload
-- directory piece by piece with moonlet.fs (off the loop thread), so no file is ever whole in
-- memory. Files up to 64 MiB (the server's max_body); a malformed form gets 400 by itself.
--   moonlet examples/upload.lua --port 8080 [--dir /tmp/uploads]      then open http://127.0.0.1:8080/
--   curl -F note=hi -F file=@README.md localhost:8080/upload
local moonlet = require "moonlet"

local dir = "/tmp/moonlet-uploads"
for i = 1, #arg do
    if arg[i] == "--dir" then dir = arg[i + 1] end
end
moonlet.fs.mkdir(dir) -- nil, "file already exists" the second time: fine

local app = moonlet.app({ max_body = 64 * 1024 * 1024 })
local uploads = 0 -- numbers each upload: two in the same second never share a file

app:get("/", function(_, res)
    res:type("html")
    return [[<!doctype html><title>moonlet upload</title>
<form method="post" action="/upload" enctype="multipart/form-data">
  <p><input name="note" placeholder="a note"></p>
  <p><input type="file" name="file" multiple></p>
  <p><button>Upload</button></p>
</form>]]
end)

app:post("/upload", function(req)
    uploads = uploads + 1
    local upload = uploads
    local fields, files = {}, {}
    for part in req:parts() do
        if part.filename then
            -- a name of our own: the client's file name is only reported, never used as a path
            local path = ("%s/%d-%d-%d"):format(dir, os.time(), upload, #files + 1)
            local size = 0
            assert(moonlet.fs.write(path, ""))
            for piece in part.read, part do
                assert(moonlet.fs.append(path, piece))
                size = size + #piece
            end
            files[#files + 1] = { field = part.name, filename = part.filename, type = part.type,
                                  size = size, saved_as = path }
        else
            fields[part.name] = part:body()
        end
    end
    return { fields = fields, files = files }
end)

return app
