/* sys.c — luaopen_oauthmail_sys: the primitives that need no TLS or crypto
 * library: the shared error value, the monotonic and wall clocks, sleep,
 * poll (the default waiter), the file family, child processes (proc),
 * isatty. A module of its own so
 * that what only reads a file (a cached `oauthmail token`) does not load
 * OpenSSL: mapping libssl and libcrypto costs a short-lived process more than
 * the rest of its work. oauthmail.core requires it and carries its fields. */
#include <errno.h>
#include <math.h>
#include <time.h>
#include <unistd.h>
#include "core.h"

/* Sleep without holding anything; used by retry back-off and tests.
 * A NaN or infinite duration (a server's "interval": NaN, say) is an argument
 * error, never an endless or undefined sleep; a day is the longest. */
static int sys_sleep(lua_State *L) {
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

static int sys_monotime(lua_State *L) {
  lua_pushnumber(L, om_now());
  return 1;
}

/* Wall-clock seconds since the epoch, with the fraction (trace timestamps). */
static int sys_time(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
  return 1;
}

/* isatty(fd) -> boolean: whether descriptor 0, 1 or 2 (or any) is a terminal,
 * for progress lines on stderr; no shell is started to ask. */
static int sys_isatty(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  luaL_argcheck(L, fd >= 0 && fd <= 65535, 1, "isatty: not a file descriptor");
  lua_pushboolean(L, isatty((int)fd) == 1);
  return 1;
}

__attribute__((visibility("default"))) int luaopen_oauthmail_sys(lua_State *L);

int luaopen_oauthmail_sys(lua_State *L) {
  lua_newtable(L);
  om_error_metatable(L);
  lua_setfield(L, -2, "error_metatable");
  lua_pushcfunction(L, sys_monotime);
  lua_setfield(L, -2, "monotime");
  lua_pushcfunction(L, sys_time);
  lua_setfield(L, -2, "time");
  lua_pushcfunction(L, sys_sleep);
  lua_setfield(L, -2, "sleep");
  lua_pushcfunction(L, sys_isatty);
  lua_setfield(L, -2, "isatty");
  om_poll_open(L);
  lua_newtable(L);
  om_fs_open(L);
  lua_setfield(L, -2, "fs");
  om_proc_open(L);
  lua_setfield(L, -2, "proc");
  return 1;
}
