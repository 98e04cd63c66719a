# luasmtp: build the C core (luasmtp/core.so), run the tests, install.
#
# Every path can be given on the command line; LuaRocks passes them from
# the rockspec (see luasmtp-scm-1.rockspec). Without them the headers and
# libraries are found with pkg-config, or else in the system directories.
#
#   make              build build/luasmtp/core.so
#   make asan         build build-asan/luasmtp/core.so with ASan + UBSan
#   make deps         install missing Debian packages (scripts/deps.sh)
#   make test         deps + build + test suite and luacheck
#   make test-asan    the same suite against the sanitizer build
#   make test-fresh   the suite on a fresh minimal Debian 12 root, as root
#                     (scripts/test-fresh.sh: mmdebstrap, chroot)
#   make run          start the development server
#   make bench        install what they need, run the benchmarks (bench/run.sh,
#                     BENCHMARKS.md)
#   make install      install module, Lua files and bin/luasmtp
#   make clean

PKG_CONFIG ?= pkg-config

# Compiler and linker flags. CFLAGS and LIBFLAG are what LuaRocks
# overrides; the warning and language flags below always apply.
CFLAGS ?= -O2 -g -fPIC
LIBFLAG ?= -shared
LDFLAGS ?=
WERROR ?= -Werror
WARNINGS = -Wall -Wextra -Wshadow -Wformat=2 $(WERROR)
STD_CFLAGS = -std=c11 -D_GNU_SOURCE -fPIC $(WARNINGS)

# -I/-L flags for a directory given on the command line; the system
# directories LuaRocks often passes are left out.
incdir = $(if $(filter-out /usr/include,$(1)),-I$(1))
libdir = $(if $(filter-out /usr/lib,$(1)),-L$(1))

# Lua 5.4 headers. The module does not link against liblua: the symbols
# come from the interpreter that loads it (LUA_LIBDIR is not needed).
ifdef LUA_INCDIR
LUA_CFLAGS = $(call incdir,$(LUA_INCDIR))
else
LUA_CFLAGS = $(shell $(PKG_CONFIG) --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
endif

# OpenSSL 3
ifdef OPENSSL_INCDIR
OPENSSL_CFLAGS = $(call incdir,$(OPENSSL_INCDIR))
OPENSSL_LIBS = $(call libdir,$(OPENSSL_LIBDIR)) -lssl -lcrypto
else
OPENSSL_CFLAGS = $(shell $(PKG_CONFIG) --cflags openssl 2>/dev/null)
OPENSSL_LIBS = $(shell $(PKG_CONFIG) --libs openssl 2>/dev/null || echo -lssl -lcrypto)
endif

# c-ares
ifdef CARES_INCDIR
CARES_CFLAGS = $(call incdir,$(CARES_INCDIR))
CARES_LIBS = $(call libdir,$(CARES_LIBDIR)) -lcares
else
CARES_CFLAGS = $(shell $(PKG_CONFIG) --cflags libcares 2>/dev/null)
CARES_LIBS = $(shell $(PKG_CONFIG) --libs libcares 2>/dev/null || echo -lcares)
endif

# libcurl (HTTP client, src/http.c)
ifdef CURL_INCDIR
CURL_CFLAGS = $(call incdir,$(CURL_INCDIR))
CURL_LIBS = $(call libdir,$(CURL_LIBDIR)) -lcurl
else
CURL_CFLAGS = $(shell $(PKG_CONFIG) --cflags libcurl 2>/dev/null)
CURL_LIBS = $(shell $(PKG_CONFIG) --libs libcurl 2>/dev/null || echo -lcurl)
endif

# zlib (gzip, src/gzip.c)
ifdef ZLIB_INCDIR
ZLIB_CFLAGS = $(call incdir,$(ZLIB_INCDIR))
ZLIB_LIBS = $(call libdir,$(ZLIB_LIBDIR)) -lz
else
ZLIB_CFLAGS = $(shell $(PKG_CONFIG) --cflags zlib 2>/dev/null)
ZLIB_LIBS = $(shell $(PKG_CONFIG) --libs zlib 2>/dev/null || echo -lz)
endif

# libpsl (the Public Suffix List, src/psl.c)
ifdef PSL_INCDIR
PSL_CFLAGS = $(call incdir,$(PSL_INCDIR))
PSL_LIBS = $(call libdir,$(PSL_LIBDIR)) -lpsl
else
PSL_CFLAGS = $(shell $(PKG_CONFIG) --cflags libpsl 2>/dev/null)
PSL_LIBS = $(shell $(PKG_CONFIG) --libs libpsl 2>/dev/null || echo -lpsl)
endif

# hiredis (Redis client, src/redis.c)
ifdef HIREDIS_INCDIR
HIREDIS_CFLAGS = $(call incdir,$(HIREDIS_INCDIR))
HIREDIS_LIBS = $(call libdir,$(HIREDIS_LIBDIR)) -lhiredis
else
HIREDIS_CFLAGS = $(shell $(PKG_CONFIG) --cflags hiredis 2>/dev/null)
HIREDIS_LIBS = $(shell $(PKG_CONFIG) --libs hiredis 2>/dev/null || echo -lhiredis)
endif

# libev ships no pkg-config file
LIBEV_CFLAGS = $(call incdir,$(LIBEV_INCDIR))
LIBEV_LIBS = $(call libdir,$(LIBEV_LIBDIR)) -lev

# src/lib is compiled without the Lua include path: a Lua header there
# fails the build.
LIB_CFLAGS = $(STD_CFLAGS) -Isrc/lib $(CFLAGS) $(OPENSSL_CFLAGS)
ALL_CFLAGS = $(STD_CFLAGS) -Isrc/lib $(CFLAGS) $(LUA_CFLAGS) $(OPENSSL_CFLAGS) \
	$(LIBEV_CFLAGS) $(CARES_CFLAGS) $(CURL_CFLAGS) $(ZLIB_CFLAGS) $(PSL_CFLAGS)
LIBS = $(OPENSSL_LIBS) $(LIBEV_LIBS) $(CARES_LIBS) $(CURL_LIBS) $(ZLIB_LIBS) $(PSL_LIBS) $(HIREDIS_LIBS) -lcrypt

# Install locations (LuaRocks passes its own LIBDIR, LUADIR and BINDIR).
# An empty INST_BINDIR skips bin/luasmtp: LuaRocks installs it itself.
PREFIX ?= /usr/local
INST_LIBDIR ?= $(PREFIX)/lib/lua/5.4
INST_LUADIR ?= $(PREFIX)/share/lua/5.4
INST_BINDIR ?= $(PREFIX)/bin

# Build directory: build/ normally, build-asan/ for `make asan`.
BUILD ?= build
# src/lib: the Lua-free library (buffers, codecs, ...), also linked by
# the fuzz harnesses; src: the Lua bindings on top of it.
LIB_SRCS = $(wildcard src/lib/*.c)
LIB_OBJS = $(patsubst src/lib/%.c,$(BUILD)/obj/lib/%.o,$(LIB_SRCS))
LIB = $(BUILD)/libluasmtp.a
SRCS = $(wildcard src/*.c)
OBJS = $(patsubst src/%.c,$(BUILD)/obj/%.o,$(SRCS))
MODULE = $(BUILD)/luasmtp/core.so

ASAN_FLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer \
	-fno-sanitize-recover=undefined

.PHONY: fuzz lib all asan deps test test-asan test-fresh run bench install clean

all: $(MODULE)

# The Lua-free library alone (the fuzz harnesses build it with their flags).
lib: $(LIB)

$(MODULE): $(OBJS) $(LIB)
	@mkdir -p $(@D)
	$(CC) $(LIBFLAG) $(CFLAGS) $(LDFLAGS) -o $@ $(OBJS) $(LIB) $(LIBS)

$(LIB): $(LIB_OBJS)
	@mkdir -p $(@D)
	rm -f $@
	$(AR) rcs $@ $(LIB_OBJS)

$(BUILD)/obj/lib/%.o: src/lib/%.c
	@mkdir -p $(@D)
	$(CC) $(LIB_CFLAGS) -MMD -MP -c -o $@ $<

$(BUILD)/obj/%.o: src/%.c
	@mkdir -p $(@D)
	$(CC) $(ALL_CFLAGS) -MMD -MP -c -o $@ $<

# hiredis's flags for the one file that includes it
$(BUILD)/obj/redis.o: ALL_CFLAGS += $(HIREDIS_CFLAGS)

-include $(OBJS:.o=.d) $(LIB_OBJS:.o=.d)

asan:
	$(MAKE) BUILD=build-asan CFLAGS="-O1 -g $(ASAN_FLAGS)" all

deps:
	@sh scripts/deps.sh

# scripts/test.sh runs busted and luacheck and ends with "N passed, M failed";
# a build that fails counts as one failed test.
BUILD_FAILED = { echo "build failed"; echo "0 passed, 1 failed"; exit 1; }

test: deps
	@$(MAKE) --no-print-directory all || $(BUILD_FAILED)
	@sh scripts/test.sh build

# The sanitizer runtimes are preloaded: lua5.4 itself is not instrumented.
test-asan: deps
	@$(MAKE) --no-print-directory all asan || $(BUILD_FAILED)
	@LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	sh scripts/test.sh build-asan

# deps.sh, the build and the suite from a clean clone of HEAD on a new
# Debian root filesystem: what a new user's two commands meet.
test-fresh:
	@bash scripts/test-fresh.sh

run: all
	lua5.4 bin/luasmtp serve examples/dev-server.lua $(or $(VAR),var)

# bench/run.sh installs the Debian packages first (a fresh machine has no
# compiler), builds, installs the npm packages and runs bench/table.py.
bench:
	@sh bench/run.sh

install: all
	install -d $(DESTDIR)$(INST_LIBDIR)/luasmtp
	install -m 755 $(MODULE) $(DESTDIR)$(INST_LIBDIR)/luasmtp/core.so
	cd lua && find luasmtp -name '*.lua' | while read -r f; do \
		install -D -m 644 "$$f" "$(DESTDIR)$(INST_LUADIR)/$$f" || exit 1; \
	done
	$(if $(INST_BINDIR),install -D -m 755 bin/luasmtp $(DESTDIR)$(INST_BINDIR)/luasmtp)

# Coverage-guided fuzzing of the protocol codecs (clang, libFuzzer).
fuzz:
	$(MAKE) -C fuzz -j4 run

clean:
	rm -rf build build-asan spec/tmp
	-$(MAKE) -C fuzz clean
