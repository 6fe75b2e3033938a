# oauthmail — build the private C module oauthmail.core for one Lua version.
#   make                      LUA_VERSION=5.4 (default), 5.1, 5.3 or jit
#   make install PREFIX=DIR   standard layout under DIR
#   make test [SPEC=...]      the specs, against a test build (test hooks compiled in)
#   make fuzz [FUZZ_TIME=60]  the libFuzzer targets under ASan+UBSan (docs/fuzzing.md)
#   make check                every test, every Lua version, ASan/UBSan, fuzz, luacheck
LUA_VERSION ?= 5.4
PREFIX      ?= /usr/local
CC          ?= cc
SANITIZE    ?=

ifeq ($(LUA_VERSION),jit)
  LUA_PC  := luajit
  LUA_BIN := luajit
  LUA_ABI := 5.1
else
  LUA_PC  := lua$(LUA_VERSION)
  LUA_BIN := lua$(LUA_VERSION)
  LUA_ABI := $(LUA_VERSION)
endif

# TESTING=1 (what `make test` sets) compiles the test hooks in
# (-DOAUTHMAIL_TESTING: fs fault injection, a fixed-nonce GCM seal); the
# module built by `make`, `make install` and luarocks has none of them.
# They go to their own folder, so the two builds never share an object.
TESTING ?=
BUILD   ?= build/$(LUA_VERSION)$(if $(SANITIZE),-san)
OUT     := $(BUILD)$(if $(TESTING),-test)
WARN    := -Wall -Wextra -Wshadow -Wmissing-prototypes -Wdeclaration-after-statement \
           -Wstrict-prototypes -Wformat=2
CFLAGS  ?= -O2 -g
# luarocks (`make rock`) names the Lua headers' folder; otherwise pkg-config does.
ifneq ($(LUA_INCDIR),)
  LUA_CFLAGS := -I$(LUA_INCDIR)
else
  LUA_CFLAGS := $(shell pkg-config --cflags $(LUA_PC))
endif
ALL_CFLAGS  = $(CFLAGS) -std=gnu99 -pthread -fPIC -fvisibility=hidden $(WARN) \
              $(LUA_CFLAGS) $(shell pkg-config --cflags openssl libcurl)
# Three modules, so a short-lived process maps only the libraries it uses:
# oauthmail.sys (files, clock, poll) links nothing but libc; oauthmail.core
# adds OpenSSL; oauthmail.curl (the HTTP family) adds libcurl and its many
# libraries, which then load only when HTTP is first used.
BASE_LDFLAGS = $(LDFLAGS) -shared -pthread -ldl
ALL_LDFLAGS = $(BASE_LDFLAGS) $(shell pkg-config --libs openssl)
CURL_LDLIBS = $(shell pkg-config --libs libcurl)
ifneq ($(TESTING),)
  ALL_CFLAGS  += -DOAUTHMAIL_TESTING
endif
ifneq ($(SANITIZE),)
  ALL_CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  ALL_LDFLAGS += -fsanitize=address,undefined
endif

SRCS := $(wildcard csrc/*.c)
OBJS := $(SRCS:csrc/%.c=$(OUT)/obj/%.o)
SYS_OBJS := $(OUT)/obj/sys.o $(OUT)/obj/fs.o $(OUT)/obj/poll.o $(OUT)/obj/proc.o $(OUT)/obj/om.o
CURL_OBJS := $(OUT)/obj/http.o $(OUT)/obj/om.o
CORE_OBJS := $(filter-out $(OUT)/obj/http.o $(OUT)/obj/sys.o $(OUT)/obj/fs.o $(OUT)/obj/poll.o $(OUT)/obj/proc.o,$(OBJS))
HDRS := $(wildcard csrc/*.h)
CORE := $(OUT)/oauthmail/core.so
SYS := $(OUT)/oauthmail/sys.so
CURL := $(OUT)/oauthmail/curl.so
LUAS := $(shell cd lua && find oauthmail -name '*.lua' | sort)

.PHONY: all install check ci setup test lint asan clean demo rockspec rock rock-install fuzz fuzz-build
all: $(SYS) $(CORE) $(CURL)

$(OUT)/obj/%.o: csrc/%.c $(HDRS) Makefile
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(CORE): $(CORE_OBJS)
	@mkdir -p $(dir $@)
	$(CC) -o $@ $(CORE_OBJS) $(ALL_LDFLAGS)

$(SYS): $(SYS_OBJS)
	@mkdir -p $(dir $@)
	$(CC) -o $@ $(SYS_OBJS) $(BASE_LDFLAGS)

$(CURL): $(CURL_OBJS)
	@mkdir -p $(dir $@)
	$(CC) -o $@ $(CURL_OBJS) $(ALL_LDFLAGS) $(CURL_LDLIBS)

install: $(SYS) $(CORE) $(CURL)
	install -d $(DESTDIR)$(PREFIX)/lib/lua/$(LUA_ABI)/oauthmail $(DESTDIR)$(PREFIX)/share/lua/$(LUA_ABI)/oauthmail
	install -m 0755 $(SYS) $(DESTDIR)$(PREFIX)/lib/lua/$(LUA_ABI)/oauthmail/sys.so
	install -m 0755 $(CORE) $(DESTDIR)$(PREFIX)/lib/lua/$(LUA_ABI)/oauthmail/core.so
	install -m 0755 $(CURL) $(DESTDIR)$(PREFIX)/lib/lua/$(LUA_ABI)/oauthmail/curl.so
	for f in $(LUAS); do \
	  install -D -m 0644 lua/$$f $(DESTDIR)$(PREFIX)/share/lua/$(LUA_ABI)/$$f || exit 1; \
	done
	# the command, for the Lua this tree was built for, finding the modules where they went
	install -d $(DESTDIR)$(PREFIX)/bin
	sed -e '1s|.*|#!$(shell command -v $(LUA_BIN))|' \
	    -e 's|^local INSTALLED = nil$$|local INSTALLED = { lua = "$(PREFIX)/share/lua/$(LUA_ABI)", lib = "$(PREFIX)/lib/lua/$(LUA_ABI)", bytecode = "$(PREFIX)/lib/oauthmail/$(LUA_BIN)" }|' \
	    bin/oauthmail > $(DESTDIR)$(PREFIX)/bin/oauthmail
	chmod 0755 $(DESTDIR)$(PREFIX)/bin/oauthmail
	# its modules precompiled for that Lua (bin/precompile; the sources stay what `require` loads)
	rm -rf $(DESTDIR)$(PREFIX)/lib/oauthmail/$(LUA_BIN)
	install -d $(DESTDIR)$(PREFIX)/lib/oauthmail/$(LUA_BIN)
	$(LUA_BIN) bin/precompile lua $(DESTDIR)$(PREFIX)/lib/oauthmail/$(LUA_BIN) $(PREFIX)/share/lua/$(LUA_ABI) >/dev/null

# What the rockspec's make backend runs (`luarocks make`): the C module is
# built in build/rock with luarocks' CC/CFLAGS and the Lua headers it found,
# then installed with the Lua modules into the tree luarocks names.
rock:
	$(MAKE) BUILD=build/rock LUA_INCDIR="$(LUA_INCDIR)" CC="$(CC)" CFLAGS="$(CFLAGS)" all

rock-install:
	install -d $(INST_LIBDIR)/oauthmail $(INST_LUADIR)/oauthmail
	install -m 0755 build/rock/oauthmail/sys.so $(INST_LIBDIR)/oauthmail/sys.so
	install -m 0755 build/rock/oauthmail/core.so $(INST_LIBDIR)/oauthmail/core.so
	install -m 0755 build/rock/oauthmail/curl.so $(INST_LIBDIR)/oauthmail/curl.so
	for f in $(LUAS); do \
	  install -D -m 0644 lua/$$f $(INST_LUADIR)/$$f || exit 1; \
	done

# One Lua version's suite: make test LUA_VERSION=5.3 [SPEC=spec/conn_spec.lua]
SPEC ?= spec
# bin/setup may have installed a newer Node.js for the peers here.
NODE_RUNTIME := $(wildcard $(CURDIR)/spec/peers/runtime/node_modules/node-linux-*/bin)
TEST_ENV = $(if $(NODE_RUNTIME),PATH="$(NODE_RUNTIME):$$PATH") LUA_VERSION=$(LUA_VERSION) OAUTHMAIL_BUILD=$(OUT) OAUTHMAIL_LUA=$(LUA_BIN) \
  OAUTHMAIL_ROOT=$(CURDIR) LUA_PATH="$(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua;$(CURDIR)/?.lua;;" \
  LUA_CPATH="$(CURDIR)/$(OUT)/?.so;;"
ifeq ($(TESTING),)
test:
	@$(MAKE) --no-print-directory test TESTING=1
else
test: $(SYS) $(CORE) $(CURL)
	$(TEST_ENV) $(SAN_ENV) $(LUA_BIN) bin/busted-run $(BUSTED_ARGS) $(SPEC)
endif

lint:
	luacheck lua spec fuzz bin/oauthmail bin/busted-run bin/module-check bin/gen-rockspec bin/precompile $(wildcard examples/*.lua examples/*/*.lua bench/*.lua)

# The lua binary is not instrumented, so the sanitizer runtimes are preloaded;
# spec/support/helpers.lua removes them again for the peers it starts.
asan:
	$(MAKE) test SANITIZE=1 LUA_VERSION=5.4 CFLAGS="-O1 -g" CC=gcc \
	  SAN_ENV='LD_PRELOAD="$(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1'


# libFuzzer targets (clang, ASan+UBSan) over the C core, see docs/fuzzing.md:
#   make fuzz [FUZZ_TIME=60 | FUZZ_RUNS=1000000] [FUZZ_TARGETS="smtp_engine jwt"]
FUZZ_CC      ?= clang
FUZZ_TIME    ?= 60
FUZZ_RUNS    ?=
FUZZ_TARGETS ?= $(patsubst fuzz/%.c,%,$(wildcard fuzz/*.c))
FUZZ_BUILD   := build/fuzz
FUZZ_CFLAGS  := -g -O1 -std=gnu99 -fno-omit-frame-pointer \
                -fsanitize=address,undefined -fno-sanitize-recover=all \
                $(shell pkg-config --cflags lua5.4 openssl libcurl)
FUZZ_OBJS    := $(SRCS:csrc/%.c=$(FUZZ_BUILD)/obj/%.o)

$(FUZZ_BUILD)/obj/%.o: csrc/%.c $(HDRS) Makefile
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -fvisibility=hidden $(WARN) -c $< -o $@

$(FUZZ_BUILD)/%: fuzz/%.c fuzz/lua_harness.h $(FUZZ_OBJS)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $(WARN) -Icsrc -DFUZZ_ROOT='"$(CURDIR)"' $< $(FUZZ_OBJS) \
	  $(shell pkg-config --libs lua5.4 openssl libcurl) -lm -o $@

fuzz-build: $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/%)

fuzz: fuzz-build
	bin/fuzz $(if $(FUZZ_RUNS),--runs $(FUZZ_RUNS),--time $(FUZZ_TIME)) $(FUZZ_TARGETS)

# Everything CI runs, after bin/setup has installed the packages.
check:
	bin/check-all

# bin/test (the README's test command) as a make target.
ci:
	bin/test

setup:
	bin/setup

# The README's second command: real peers on loopback, one message sent and shown.
demo:
	bin/demo

rockspec:
	lua5.4 bin/gen-rockspec

clean:
	rm -rf build
