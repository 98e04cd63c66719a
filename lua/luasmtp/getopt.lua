--- luasmtp.getopt: long options for examples and commands.
--
--   local opts, rest = getopt.parse(arg, { listen = "string", verbose = "flag" }, usage)
-- "--name value", "--name=value" and "--flag" are understood; "--"
-- ends the options. Unknown or malformed options raise usage errors
-- (error objects { usage = true, message = ... }).
local M = {}

local function usage_error(message)
  error({ usage = true, message = message }, 0)
end

--- parse(argv, spec [, short]) -> opts, rest
-- spec kinds: "string", "number" (positive), "list" (comma separated),
-- "flag". short(arg, take_value), when given, handles every other
-- argument that starts with "-" (sendmail-style options); take_value(name,
-- attached) returns the option's value: the attached text or the next
-- argument.
function M.usage_error(message)
  usage_error(message)
end

function M.parse(argv, spec, short)
  local opts, rest = {}, {}
  local i = 1
  local function take_value(name, attached)
    if attached and attached ~= "" then return attached end
    i = i + 1
    if argv[i] == nil then usage_error(name .. " needs a value") end
    return argv[i]
  end
  while argv[i] do
    local a = argv[i]
    if a == "--" then
      table.move(argv, i + 1, #argv, #rest + 1, rest)
      break
    end
    local name, value = a:match("^%-%-([%w%-]+)=(.*)$")
    name = name or a:match("^%-%-([%w%-]+)$")
    if name then
      local kind = spec[name]
      if not kind then usage_error("unknown option --" .. name) end
      if kind == "flag" then
        if value then usage_error("--" .. name .. " takes no value") end
        opts[name] = true
      else
        if not value then
          i = i + 1
          value = argv[i]
          if value == nil then usage_error("--" .. name .. " needs a value") end
        end
        if kind == "number" then
          value = tonumber(value) or usage_error("--" .. name .. " needs a number")
          if value <= 0 then usage_error("--" .. name .. " must be positive") end
        elseif kind == "list" then
          local list = {}
          for item in value:gmatch("[^,%s]+") do list[#list + 1] = item end
          value = list
        end
        opts[name] = value
      end
    elseif short and a:sub(1, 1) == "-" and a ~= "-" then
      short(a, take_value, opts)
    else
      rest[#rest + 1] = a
    end
    i = i + 1
  end
  return opts, rest
end

--- Run main(argv) turning usage errors into a message and exit 64.
function M.run(main, argv, usage)
  local ok, res = pcall(main, argv)
  if ok then return res end
  if type(res) == "table" and res.usage then
    io.stderr:write(res.message, "\n", usage or "")
    os.exit(64)
  end
  error(res, 0)
end

return M
