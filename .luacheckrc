std = "luajit"
max_line_length = 110
unused_args = false
files["spec"] = { std = "+busted" }
files["lua/moonlet/cli.lua"] = { globals = { "arg" } }
