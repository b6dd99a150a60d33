-- lua/moonlet/httpdate.lua: the dates of HTTP as Unix times. days_from_civil is the arithmetic of
-- civil dates (shared by the cookie jar's RFC 6265 date parser); parse reads an HTTP-date in any
-- of its three forms (RFC 9110 5.6.7), for the preconditions of static files.
local floor, tonumber = math.floor, tonumber
local str_match, lower = string.match, string.lower

local _M = {}

-- three-letter month names, lower case -> 1..12
_M.MONTHS = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6, jul = 7, aug = 8, sep = 9,
              oct = 10, nov = 11, dec = 12 }
local MONTHS = _M.MONTHS

-- syntax: days = httpdate.days_from_civil(y, m, d) -- days since 1970-01-01 of a civil date
-- (proleptic Gregorian; Howard Hinnant's algorithm)
function _M.days_from_civil(y, m, d)
    if m <= 2 then y = y - 1 end
    local era = floor(y / 400)
    local yoe = y - era * 400
    local doy = floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
    return era * 146097 + yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy - 719468
end
local days_from_civil = _M.days_from_civil

-- syntax: t = httpdate.parse(s) -- the time of an HTTP-date in any of its three forms (IMF-fixdate
-- "Sun, 06 Nov 1994 08:49:37 GMT", RFC 850 "Sunday, 06-Nov-94 08:49:37 GMT", asctime
-- "Sun Nov  6 08:49:37 1994"), or nil when s is none of them
function _M.parse(s)
    local d, mon, y, hh, mi, ss =
        str_match(s, "^%s*%a%a%a, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT%s*$")
    if not d then
        d, mon, y, hh, mi, ss = str_match(s, "^%s*%a+, (%d%d)%-(%a%a%a)%-(%d%d) (%d%d):(%d%d):(%d%d) GMT%s*$")
        if y then y = tonumber(y) + (tonumber(y) < 70 and 2000 or 1900) end
    end
    if not d then
        mon, d, hh, mi, ss, y =
            str_match(s, "^%s*%a%a%a (%a%a%a) ([ %d]%d) (%d%d):(%d%d):(%d%d) (%d%d%d%d)%s*$")
    end
    local m = mon and MONTHS[lower(mon)]
    if not m then return nil end
    d, y, hh, mi, ss = tonumber(d), tonumber(y), tonumber(hh), tonumber(mi), tonumber(ss)
    if d < 1 or d > 31 or hh > 23 or mi > 59 or ss > 60 then return nil end
    return ((days_from_civil(y, m, d) * 24 + hh) * 60 + mi) * 60 + ss
end

return _M
