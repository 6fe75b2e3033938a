-- oauthmail.message.types — the file extension -> MIME type table used to
-- guess an attachment's Content-Type.
local M = {}

local TYPES = {
  pdf = "application/pdf", zip = "application/zip", gz = "application/gzip",
  tgz = "application/gzip", tar = "application/x-tar", ["7z"] = "application/x-7z-compressed",
  json = "application/json", xml = "application/xml", js = "text/javascript",
  doc = "application/msword", xls = "application/vnd.ms-excel", ppt = "application/vnd.ms-powerpoint",
  docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
  xlsx = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
  pptx = "application/vnd.openxmlformats-officedocument.presentationml.presentation",
  odt = "application/vnd.oasis.opendocument.text", ods = "application/vnd.oasis.opendocument.spreadsheet",
  rtf = "application/rtf",
  txt = "text/plain", log = "text/plain", md = "text/markdown", csv = "text/csv",
  html = "text/html", htm = "text/html", css = "text/css", ics = "text/calendar",
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
  webp = "image/webp", svg = "image/svg+xml", bmp = "image/bmp", ico = "image/x-icon",
  tif = "image/tiff", tiff = "image/tiff",
  mp3 = "audio/mpeg", wav = "audio/wav", ogg = "audio/ogg", mp4 = "video/mp4", webm = "video/webm",
}

local function guess_type(filename)
  local ext = filename and filename:match("%.([%w]+)$")
  return ext and TYPES[ext:lower()] or "application/octet-stream"
end

M.TYPES, M.guess = TYPES, guess_type

return M
