/* lua_harness.h — what the libFuzzer targets that drive oauthmail.core
 * through Lua share: one interpreter per process, with the C module linked in
 * (instrumented) and the project's Lua modules on package.path, and a driver
 * file that returns the function each input is handed to.
 *
 * A driver signals a finding by raising: the harness prints the message and
 * aborts, so libFuzzer keeps the input as a crash. */
#ifndef OAUTHMAIL_FUZZ_LUA_HARNESS_H
#define OAUTHMAIL_FUZZ_LUA_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_oauthmail_sys(lua_State *L);
int luaopen_oauthmail_core(lua_State *L);

/* FUZZ_ROOT is the checkout, given by the Makefile. */
#ifndef FUZZ_ROOT
#error "build with -DFUZZ_ROOT=\"/path/to/checkout\""
#endif

static lua_State *harness_L;
static int harness_fn = LUA_NOREF;

static inline void harness_init(const char *driver) {
  lua_State *L = luaL_newstate();
  if (!L) abort();
  luaL_openlibs(L);
  luaL_requiref(L, "oauthmail.sys", luaopen_oauthmail_sys, 0);
  lua_pop(L, 1);
  luaL_requiref(L, "oauthmail.core", luaopen_oauthmail_core, 0);
  lua_pop(L, 1);
  lua_getglobal(L, "package");
  lua_pushstring(L, FUZZ_ROOT "/lua/?.lua;" FUZZ_ROOT "/lua/?/init.lua;" FUZZ_ROOT "/fuzz/?.lua");
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
  if (luaL_dofile(L, driver) != 0) {
    fprintf(stderr, "fuzz driver %s: %s\n", driver, lua_tostring(L, -1));
    abort();
  }
  if (!lua_isfunction(L, -1)) {
    fprintf(stderr, "fuzz driver %s did not return a function\n", driver);
    abort();
  }
  harness_fn = luaL_ref(L, LUA_REGISTRYINDEX);
  harness_L = L;
}

/* Everything an input made is freed before the next one: engines run their
 * __gc (which frees and wipes their C buffers), and libFuzzer, which reads
 * more mallocs than frees in a run as a possible leak and then scans the
 * heap, sees balanced runs, so a real leak in the C core stands out. */
static inline void harness_collect(lua_State *L) {
  lua_gc(L, LUA_GCCOLLECT, 0);
}

static inline int harness_traceback(lua_State *L) {
  luaL_traceback(L, L, lua_tostring(L, 1), 1);
  return 1;
}

static inline void harness_run(const uint8_t *data, size_t size) {
  lua_State *L = harness_L;
  int base = lua_gettop(L);
  lua_pushcfunction(L, harness_traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, harness_fn);
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, base + 1) != 0) {
    fprintf(stderr, "fuzz finding: %s\n", lua_tostring(L, -1));
    abort();
  }
  lua_settop(L, base);
  harness_collect(L);
}

#endif
