# moonlet: `make run` serves the default app, `make test` runs every spec. `make help` lists the rest.
# Dependencies are Debian packages (scripts/deps.sh installs the missing ones when run as root);
# llhttp's C sources are compiled from /usr/share/llhttp, never copied here.

CC       ?= cc
PORT     ?= 8080
BUILD    := build
LLHTTP_SRC ?= /usr/share/llhttp
LLHTTP_INC ?= /usr/share/include/llhttp
PKGS     := luajit libuv
# headers only, each opened with dlopen on first use (core/dynlib.h): libpq (bindings/pq_api.c),
# OpenSSL (core/openssl_api.c), SQLite (bindings/sqlite_api.c), PCRE2 (bindings/pcre2_api.c),
# zlib (core/zlib_api.c)
HDR_PKGS := libpq openssl sqlite3 libpcre2-8 zlib

ifeq ($(SANITIZE),1)
BUILD    := build-asan
SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
OPT      := -O1 -g
else
OPT      := -O2 -g
endif

DEPS_OK  := $(BUILD)/.deps-ok
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) $(HDR_PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null) -ldl -lpthread
CFLAGS_ALL = -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror $(OPT) -fPIC $(SANFLAGS) \
             -I$(LLHTTP_INC) $(PKG_CFLAGS) -DMOONLET_LUA_DIR='"$(CURDIR)/lua"' $(CFLAGS)
LDFLAGS_ALL = $(SANFLAGS) -Wl,-E $(LDFLAGS)

CORE_SRC := $(wildcard core/*.c)
BIND_SRC := $(wildcard bindings/*.c)
LIB_OBJ  := $(CORE_SRC:%.c=$(BUILD)/%.o) $(BIND_SRC:%.c=$(BUILD)/%.o) \
            $(BUILD)/llhttp/llhttp.o $(BUILD)/llhttp/api.o $(BUILD)/llhttp/http.o
HDRS     := $(wildcard core/*.h bindings/*.h)

.PHONY: all run test bench deps lint clean help examples static print-static-archives fuzz
all: $(BUILD)/moonlet $(BUILD)/libmoonlet.a $(BUILD)/libmoonlet.so

help:
	@echo "make run        install what is missing, build, serve apps/welcome on http://127.0.0.1:$(PORT)"
	@echo "make test       build and run every spec (SANITIZE=1: under ASan+UBSan)"
	@echo "make bench      moonlet beside nginx+lua and the other peers (wrk, pinned cores)"
	@echo "make lint       luacheck + clang-format check"
	@echo "make examples   the embedding examples of examples/embed into $(BUILD)/examples/"
	@echo "make static     $(BUILD)/moonlet-static and iot_device-static: one executable each, glibc included"
	@echo "make fuzz       the fuzz tests of spec/c under libFuzzer (clang), FUZZ_TIME seconds each (60)"

deps: $(DEPS_OK)
$(DEPS_OK): scripts/deps.sh
	@sh scripts/deps.sh
	@mkdir -p $(BUILD) && touch $@

$(BUILD)/%.o: %.c $(HDRS) | $(DEPS_OK)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

# llhttp from the Debian package; strict mode refuses bare CR/LF and other lenient forms.
$(BUILD)/llhttp/%.o: $(LLHTTP_SRC)/%.c | $(DEPS_OK)
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(OPT) -fPIC $(SANFLAGS) -DLLHTTP_STRICT_MODE=1 -I$(LLHTTP_INC) -c $< -o $@

$(BUILD)/libmoonlet.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libmoonlet.so: $(LIB_OBJ)
	$(CC) -shared -o $@ $^ $(LDFLAGS_ALL) $(PKG_LIBS) -lm

$(BUILD)/moonlet: $(BUILD)/cli/main.o $(BUILD)/libmoonlet.a
	$(CC) -o $@ $< $(BUILD)/libmoonlet.a $(LDFLAGS_ALL) $(PKG_LIBS) -lm

CTEST_SRC := $(wildcard spec/c/test_*.c)
CTESTS    := $(CTEST_SRC:%.c=$(BUILD)/%)
$(BUILD)/spec/c/%: spec/c/%.c $(wildcard spec/c/*.h) $(BUILD)/libmoonlet.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ $< $(BUILD)/libmoonlet.a $(LDFLAGS_ALL) $(PKG_LIBS) -lm
# A machine without the libraries opened on first use: the test links its own copies of their loaders,
# whose sonames name none, ahead of libmoonlet.a (whose copies are then left out).
LOADERS_SRC := core/openssl_api.c bindings/sqlite_api.c bindings/pcre2_api.c core/zlib_api.c \
               bindings/pq_api.c
$(BUILD)/spec/c/test_libs_missing: spec/c/test_libs_missing.c spec/c/ctest.h $(LOADERS_SRC) $(HDRS) \
                                   $(BUILD)/libmoonlet.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -DML_OPENSSL_SONAME='"libmoonlet-no-such-ssl.so.3"' \
	  -DML_SQLITE_SONAME='"libmoonlet-no-such-sqlite3.so.0"' -DML_PCRE2_SONAME='"libmoonlet-no-such-pcre2.so.0"' \
	  -DML_ZLIB_SONAME='"libmoonlet-no-such-z.so.1"' -DML_PQ_SONAME='"libmoonlet-no-such-pq.so.5"' \
	  -o $@ $< $(LOADERS_SRC) $(BUILD)/libmoonlet.a $(LDFLAGS_ALL) $(PKG_LIBS) -lm

# The embedding examples (examples/embed/*.c), each a host linked with libmoonlet.a; the test suite
# starts them (spec/embed_spec.lua). EXAMPLES_DIR lets game_loop find its Lua app next to its source.
EXAMPLE_SRC := $(wildcard examples/embed/*.c)
EXAMPLES    := $(EXAMPLE_SRC:examples/embed/%.c=$(BUILD)/examples/%)
examples: $(EXAMPLES)
$(BUILD)/examples/%: examples/embed/%.c core/moonlet.h $(BUILD)/libmoonlet.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -DEXAMPLES_DIR='"$(CURDIR)/examples/embed"' -o $@ $< \
	  $(BUILD)/libmoonlet.a $(LDFLAGS_ALL) $(PKG_LIBS) -lm

# `make static`: one self-contained executable for deployment and devices. Everything is linked
# in from Debian's .a archives, glibc included: LuaJIT, libuv, OpenSSL, SQLite, zlib, PCRE2 and
# lua-cjson (registered in package.preload by bindings/linked_modules.c, since a static executable
# cannot dlopen a Lua C module). libpq stays a dlopen on first use (bindings/pq_api.c). The linker script of
# scripts/static-ld.sh keeps the cold libraries out of the hot pages: idle RSS ~2.8 MB, against
# ~4.1 MB for the dynamic build/moonlet (docs/embedding.md has the figures). Needs no sanitizer.
STATIC_A    = $(foreach a,liblua5.1-cjson.a libluajit-5.1.a libuv_a.a libssl.a libcrypto.a \
                libsqlite3.a libz.a libpcre2-8.a,$(shell $(CC) -print-file-name=$(a)))
STATIC_LINK = $(if $(STATIC_NOSTRIP),,-s) -static -no-pie -Wl,-T,$(BUILD)/static.ld -Wl,--gc-sections \
              -Wl,--eh-frame-hdr -Wl,--wrap=__register_frame_info -Wl,--wrap=__deregister_frame_info \
              -Wl,-u,luaopen_cjson -Wl,-u,luaopen_cjson_safe $(STATIC_A) -lm -ldl -lpthread
static: $(BUILD)/moonlet-static $(BUILD)/examples/iot_device-static
$(BUILD)/static.ld: scripts/static-ld.sh scripts/static-hot.txt | $(DEPS_OK)
	sh scripts/static-ld.sh $(CC) > $@
print-static-archives: # for scripts/static-profile.sh
	@echo $(STATIC_A)
# glibc's linker warns that getaddrinfo and dlopen in a static executable need the same glibc at
# run time: true of any machine this tree is built on; those lines are filtered out.
# STATIC_OBJ: the unwinder's registration made a no-op; the tables of the libraries opened on first
# use (OpenSSL, SQLite, PCRE2, zlib) filled from the archives.
STATIC_OBJ  = $(BUILD)/cli/static_unwind.o $(BUILD)/cli/static_libs.o
$(BUILD)/moonlet-static: $(BUILD)/cli/main.o $(STATIC_OBJ) $(BUILD)/libmoonlet.a $(BUILD)/static.ld
	@rm -f $@
	$(CC) -o $@ $< $(STATIC_OBJ) $(BUILD)/libmoonlet.a $(STATIC_LINK) 2>&1 | \
	  { grep -v -e 'statically linked applications requires at runtime' -e ': in function' || true; }
	@test -x $@
$(BUILD)/examples/iot_device-static: examples/embed/iot_device.c core/moonlet.h $(BUILD)/libmoonlet.a \
                                     $(STATIC_OBJ) $(BUILD)/static.ld
	@mkdir -p $(dir $@) && rm -f $@
	$(CC) $(CFLAGS_ALL) -DEXAMPLES_DIR='"$(CURDIR)/examples/embed"' -o $@ $< \
	  $(STATIC_OBJ) $(BUILD)/libmoonlet.a $(STATIC_LINK) 2>&1 | \
	  { grep -v -e 'statically linked applications requires at runtime' -e ': in function' || true; }
	@test -x $@

# `make fuzz`: the fuzz tests of spec/c (test_fuzz_*.c) under libFuzzer with clang, ASan and UBSan:
# coverage-guided, FUZZ_TIME seconds each, from the seeds the tests carry; what fails is kept in
# $(BUILD)/fuzz. `make test` runs the same tests on a fixed set of mutated inputs instead.
FUZZ_TIME  ?= 60
FUZZ_CC    ?= clang
FUZZ_FLAGS  = -std=c11 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer,address,undefined \
              -fno-sanitize-recover=undefined -DML_LIBFUZZER -DLLHTTP_STRICT_MODE=1 -I$(LLHTTP_INC)
FUZZ_HTTP_SRC = $(filter core/http_%.c core/listen.c core/log.c core/access_log.c core/log_out.c core/numfmt.c core/block_cache.c core/tls.c core/openssl_api.c,$(CORE_SRC)) \
                $(LLHTTP_SRC)/llhttp.c $(LLHTTP_SRC)/api.c $(LLHTTP_SRC)/http.c
fuzz: $(BUILD)/fuzz/http $(BUILD)/fuzz/ws $(BUILD)/spec/c/test_fuzz_http $(BUILD)/spec/c/test_fuzz_ws
	@for t in http ws; do \
	  mkdir -p $(BUILD)/fuzz/corpus-$$t && \
	  ML_FUZZ_SEEDS_DIR=$(BUILD)/fuzz/corpus-$$t $(BUILD)/spec/c/test_fuzz_$$t && \
	  (cd $(BUILD)/fuzz && ./$$t -max_total_time=$(FUZZ_TIME) -max_len=4096 -timeout=10 \
	     -print_final_stats=1 corpus-$$t) || exit 1; \
	done
$(BUILD)/fuzz/http: spec/c/test_fuzz_http.c $(wildcard spec/c/*.h) $(FUZZ_HTTP_SRC) $(HDRS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< $(FUZZ_HTTP_SRC) $(shell pkg-config --cflags --libs libuv openssl)
$(BUILD)/fuzz/ws: spec/c/test_fuzz_ws.c spec/c/fuzz.h spec/c/ctest.h core/ws.c core/ws.h core/openssl_api.c \
                  core/zlib_api.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< core/ws.c core/openssl_api.c core/zlib_api.c \
	  $(shell pkg-config --cflags --libs libuv openssl zlib) -ldl

run: $(BUILD)/moonlet
	./$(BUILD)/moonlet apps/welcome/app.lua --port $(PORT)

# The static executables are tested too (spec/static_build_spec.lua), except under SANITIZE=1:
# ASan and UBSan need the shared libraries.
test: $(BUILD)/moonlet $(CTESTS) examples $(if $(SANFLAGS),,static)
	@sh scripts/deps.sh test
	@BUILD=$(BUILD) SANITIZE=$(SANITIZE) sh spec/run.sh

bench: $(BUILD)/moonlet $(if $(SANFLAGS),,static)
	@sh scripts/bench.sh

lint: $(DEPS_OK)
	luacheck lua apps examples spec scripts
	clang-format --dry-run -Werror core/*.[ch] bindings/*.[ch] cli/*.c

clean:
	rm -rf build build-asan
