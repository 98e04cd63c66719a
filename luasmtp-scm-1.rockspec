-- LuaRocks build of luasmtp from a checkout:
--   luarocks --lua-version=5.4 make luasmtp-scm-1.rockspec
-- The C core is built by the Makefile with the paths LuaRocks found;
-- the Lua modules are installed by `make install`, the command-line
-- script by LuaRocks itself (so that it is wrapped with the right paths).
rockspec_format = "3.0"
package = "luasmtp"
version = "scm-1"

source = {
  url = "git+file://.",
}

description = {
  summary = "SMTP servers and clients for Lua 5.4 on a libev/OpenSSL C core",
  detailed = [[
    An SMTP toolkit: the C core does the protocol mechanics, TLS
    (OpenSSL 3), asynchronous DNS (c-ares) and I/O on a libev event loop;
    Lua scripts carry the policy and run as coroutine tasks.
  ]],
}

dependencies = {
  "lua >= 5.4",
}

external_dependencies = {
  OPENSSL = { header = "openssl/ssl.h" },
  LIBEV = { header = "ev.h" },
  CARES = { header = "ares.h" },
  -- curl/curl.h sits in the multiarch include directory on Debian,
  -- where LuaRocks does not look: find the library instead.
  CURL = { library = "curl" },
  ZLIB = { header = "zlib.h" },
  PSL = { header = "libpsl.h" },
  HIREDIS = { header = "hiredis/hiredis.h" },
}

build = {
  type = "make",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    OPENSSL_INCDIR = "$(OPENSSL_INCDIR)",
    OPENSSL_LIBDIR = "$(OPENSSL_LIBDIR)",
    LIBEV_INCDIR = "$(LIBEV_INCDIR)",
    LIBEV_LIBDIR = "$(LIBEV_LIBDIR)",
    CARES_INCDIR = "$(CARES_INCDIR)",
    CARES_LIBDIR = "$(CARES_LIBDIR)",
    CURL_INCDIR = "$(CURL_INCDIR)",
    CURL_LIBDIR = "$(CURL_LIBDIR)",
    ZLIB_INCDIR = "$(ZLIB_INCDIR)",
    ZLIB_LIBDIR = "$(ZLIB_LIBDIR)",
    PSL_INCDIR = "$(PSL_INCDIR)",
    PSL_LIBDIR = "$(PSL_LIBDIR)",
    HIREDIS_INCDIR = "$(HIREDIS_INCDIR)",
    HIREDIS_LIBDIR = "$(HIREDIS_LIBDIR)",
  },
  install_variables = {
    INST_LIBDIR = "$(LIBDIR)",
    INST_LUADIR = "$(LUADIR)",
    INST_BINDIR = "", -- bin/luasmtp is installed below
  },
  install = {
    bin = { luasmtp = "bin/luasmtp" },
  },
}
