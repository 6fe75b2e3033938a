/* core.c — luaopen_oauthmail_core: builds the private module from one list of
 * primitive families (one C file each). The HTTP family is a module of its
 * own, oauthmail.curl (http.c), so that loading the core does not load
 * libcurl and its libraries: a cached `oauthmail token` never needs them. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include "core.h"

static const struct {
  const char *name;
  void (*open)(lua_State *L);
} families[] = {
  { "conn", om_conn_open },
  { "fs", om_fs_open },
  { "crypto", om_crypto_open },
  { "smtp", om_smtp_open },
  { "resp", om_resp_open },
  { "spool", om_spool_open },
  { NULL, NULL }
};


/* Sleep without holding anything; used by retry back-off and tests. */
/* A NaN or infinite duration (a server's "interval": NaN, say) is an argument
 * error, never an endless or undefined sleep; a day is the longest. */
static int core_sleep(lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  struct timespec ts;
  luaL_argcheck(L, isfinite(s), 1, "sleep: duration must be a finite number of seconds");
  if (s < 0) s = 0;
  if (s > 86400) s = 86400;
  ts.tv_sec = (time_t)s;
  ts.tv_nsec = (long)((s - (lua_Number)ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
  return 0;
}

static int core_monotime(lua_State *L) {
  lua_pushnumber(L, om_now());
  return 1;
}

__attribute__((visibility("default"))) int luaopen_oauthmail_core(lua_State *L);

int luaopen_oauthmail_core(lua_State *L) {
  int i;
  om_error_metatable(L);
  lua_newtable(L);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "error_metatable");
  lua_pushcfunction(L, core_monotime);
  lua_setfield(L, -2, "monotime");
  lua_pushcfunction(L, core_sleep);
  lua_setfield(L, -2, "sleep");
  om_poll_open(L);
  for (i = 0; families[i].name; i++) {
    lua_newtable(L);
    families[i].open(L);
    lua_setfield(L, -2, families[i].name);
  }
  return 1;
}
