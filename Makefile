# moonlet: `make run` serves the default app, `make test` runs every spec. `make help` lists the rest.
# Dependencies are Debian packages (scripts/deps.sh installs the missing ones when run as root);
# llhttp's C sources are compiled from /usr/share/llhttp, never copied here.

CC       ?= cc
PORT     ?= 8080
BUILD    := build
LLHTTP_SRC ?= /usr/share/llhttp
LLHTTP_INC ?= /usr/share/include/llhttp
PKGS     := luajit libuv openssl zlib sqlite3
HDR_PKGS := libpq # headers only: bindings/pg.c opens libpq with dlopen on first use

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

.PHONY: all run test bench deps lint clean help examples static
all: $(BUILD)/moonlet $(BUILD)/libmoonlet.a $(BUILD)/libmoonlet.so

help:
	@echo "make run        install what is missing, build, serve apps/welcome on http://127.0.0.1:$(PORT)"
	@echo "make test       build and run every spec (SANITIZE=1: under ASan+UBSan)"
	@echo "make bench      moonlet beside nginx+lua and the other peers (wrk, pinned cores)"
	@echo "make lint       luacheck + clang-format check"
	@echo "make examples   the embedding examples of examples/embed into $(BUILD)/examples/"
	@echo "make static     $(BUILD)/moonlet-static and iot_device-static: LuaJIT, libuv... linked in"

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
$(BUILD)/spec/c/%: spec/c/%.c spec/c/ctest.h $(BUILD)/libmoonlet.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ $< $(BUILD)/libmoonlet.a $(LDFLAGS_ALL) $(PKG_LIBS) -lm

# The embedding examples (examples/embed/*.c), each a host linked with libmoonlet.a; the test suite
# starts them (spec/embed_spec.lua). EXAMPLES_DIR lets game_loop find its Lua app next to its source.
EXAMPLE_SRC := $(wildcard examples/embed/*.c)
EXAMPLES    := $(EXAMPLE_SRC:examples/embed/%.c=$(BUILD)/examples/%)
examples: $(EXAMPLES)
$(BUILD)/examples/%: examples/embed/%.c core/moonlet.h $(BUILD)/libmoonlet.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -DEXAMPLES_DIR='"$(CURDIR)/examples/embed"' -o $@ $< \
	  $(BUILD)/libmoonlet.a $(LDFLAGS_ALL) $(PKG_LIBS) -lm

# `make static`: LuaJIT and libuv linked in from their .a archives (Debian names libuv's
# libuv_a.a); the other libraries of PKGS and glibc stay shared; stripped. docs/embedding.md
# reports the sizes.
STATIC_LIBS  = $(patsubst -luv,-l:libuv_a.a,$(patsubst -lluajit-5.1,-l:libluajit-5.1.a, \
               $(shell pkg-config --libs-only-l $(PKGS)))) -lm
static: $(BUILD)/moonlet-static $(BUILD)/examples/iot_device-static
$(BUILD)/moonlet-static: $(BUILD)/cli/main.o $(BUILD)/libmoonlet.a
	$(CC) -s -o $@ $< $(BUILD)/libmoonlet.a $(LDFLAGS_ALL) $(STATIC_LIBS)
$(BUILD)/examples/iot_device-static: examples/embed/iot_device.c core/moonlet.h $(BUILD)/libmoonlet.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -s -o $@ $< $(BUILD)/libmoonlet.a $(LDFLAGS_ALL) $(STATIC_LIBS)

run: $(BUILD)/moonlet
	./$(BUILD)/moonlet apps/welcome/app.lua --port $(PORT)

test: $(BUILD)/moonlet $(CTESTS) examples
	@sh scripts/deps.sh test
	@BUILD=$(BUILD) SANITIZE=$(SANITIZE) sh spec/run.sh

bench: $(BUILD)/moonlet
	@sh scripts/bench.sh

lint: $(DEPS_OK)
	luacheck lua apps examples spec
	clang-format --dry-run -Werror core/*.[ch] bindings/*.[ch] cli/*.c

clean:
	rm -rf build build-asan
