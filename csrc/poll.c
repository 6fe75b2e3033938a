/* poll.c — the default waiter's one primitive: poll(2) on one descriptor, or
 * on many for the built-in loop (lua/oauthmail/loop.lua). This is the only
 * place in the C core that blocks, and only when Lua asks it to: the steps
 * never call it. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"

#define POLL_MANY_MAX 65536

static short events_of(lua_State *L, int arg, const char *s) {
  short ev = 0;
  if (strchr(s, 'r')) ev |= POLLIN;
  if (strchr(s, 'w')) ev |= POLLOUT;
  if (!ev) luaL_argerror(L, arg, "events must be \"r\", \"w\" or \"rw\"");
  return ev;
}

/* Milliseconds for poll(): rounded up, so a wait never ends before its time. */
static int timeout_ms(lua_State *L, int arg) {
  lua_Number t;
  if (lua_isnoneornil(L, arg)) return -1;
  t = luaL_checknumber(L, arg);
  luaL_argcheck(L, t == t, arg, "timeout must be a number");
  if (t <= 0) return 0;
  if (t > 86400) t = 86400;
  return (int)ceil(t * 1000.0);
}

static int do_poll(struct pollfd *p, nfds_t n, int ms) {
  double until = ms >= 0 ? om_now() + ms / 1000.0 : 0;
  for (;;) {
    int rc = poll(p, n, ms);
    if (rc >= 0 || errno != EINTR) return rc;
    if (ms >= 0) {
      double left = until - om_now();
      ms = left > 0 ? (int)ceil(left * 1000.0) : 0;
    }
  }
}

/* core.poll(fd, "r"|"w"|"rw", timeout) -> true (ready, or the fd has an
 * error/hang-up for the next step to report) | false (timed out) | nil, err */
static int core_poll(lua_State *L) {
  struct pollfd p;
  int rc;
  p.fd = (int)luaL_checkinteger(L, 1);
  p.events = events_of(L, 2, luaL_checkstring(L, 2));
  p.revents = 0;
  rc = do_poll(&p, 1, timeout_ms(L, 3));
  if (rc < 0) return om_fail(L, "network", "error", "poll: %s", strerror(errno));
  lua_pushboolean(L, rc > 0);
  return 1;
}

/* core.poll_many({fd1, ev1, fd2, ev2, ...}, timeout) -> {i, ...} indexes (1-based
 * pair numbers) of the ready entries, possibly empty | nil, err */
static int core_poll_many(lua_State *L) {
  lua_Integer n, i;
  struct pollfd *p;
  int rc, ms, k = 0;
  luaL_checktype(L, 1, LUA_TTABLE);
  n = (lua_Integer)om_rawlen(L, 1) / 2;
  luaL_argcheck(L, n <= POLL_MANY_MAX, 1, "too many descriptors");
  ms = timeout_ms(L, 2);
  p = (struct pollfd *)lua_newuserdata(L, (size_t)(n ? n : 1) * sizeof *p);
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, 1, (int)(2 * i + 1));
    lua_rawgeti(L, 1, (int)(2 * i + 2));
    p[i].fd = (int)luaL_checkinteger(L, -2);
    p[i].events = events_of(L, 1, luaL_checkstring(L, -1));
    p[i].revents = 0;
    lua_pop(L, 2);
  }
  rc = do_poll(p, (nfds_t)n, ms);
  if (rc < 0) return om_fail(L, "network", "error", "poll: %s", strerror(errno));
  lua_createtable(L, rc, 0);
  for (i = 0; i < n; i++) {
    if (p[i].revents) {
      lua_pushinteger(L, i + 1);
      lua_rawseti(L, -2, ++k);
    }
  }
  return 1;
}

static const luaL_Reg poll_funcs[] = {
  { "poll", core_poll },
  { "poll_many", core_poll_many },
  { NULL, NULL }
};

void om_poll_open(lua_State *L) {
  om_setfuncs(L, poll_funcs);
}
