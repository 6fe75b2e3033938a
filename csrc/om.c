/* om.c — what every C module of oauthmail shares: the error value (its
 * metatable and how it prints), the option readers, the monotonic clock.
 * Linked into oauthmail.core and into oauthmail.curl. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include "core.h"

/* "kind error: message [code enhanced] (provider_code)\n  hint: hint": the
 * one way an error value prints, whether C or Lua made it. The metatable is
 * complete here, so oauthmail.errors only uses it and changes nothing. */
/* Pushes before .. field .. after when the field is a string or a number;
 * returns how many values it pushed (0 or 1). */
static int push_field(lua_State *L, int idx, const char *name, const char *before, const char *after) {
  const char *s;
  lua_getfield(L, idx, name);
  s = lua_type(L, -1) == LUA_TSTRING || lua_type(L, -1) == LUA_TNUMBER ? lua_tostring(L, -1) : NULL;
  if (!s) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushfstring(L, "%s%s%s", before, s, after);
  lua_remove(L, -2);
  return 1;
}

static int error_tostring(lua_State *L) {
  const char *kind, *msg;
  int n = 1;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  lua_getfield(L, 1, "kind");
  lua_getfield(L, 1, "message");
  kind = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : NULL;
  msg = lua_type(L, 3) == LUA_TSTRING || lua_type(L, 3) == LUA_TNUMBER ? lua_tostring(L, 3) : NULL;
  lua_pushfstring(L, "%s error: %s", kind ? kind : "unknown", msg ? msg : "(no message)");
  lua_replace(L, 2);
  lua_settop(L, 2);
  lua_getfield(L, 1, "code");
  if (lua_toboolean(L, -1)) {
    lua_pop(L, 1);
    n += push_field(L, 1, "code", " [", "");
    n += push_field(L, 1, "enhanced", " ", "");
    lua_pushliteral(L, "]");
    n++;
  } else {
    lua_pop(L, 1);
  }
  n += push_field(L, 1, "provider_code", " (", ")");
  n += push_field(L, 1, "hint", "\n  hint: ", "");
  lua_concat(L, n);
  return 1;
}

static void push_error_va(lua_State *L, const char *kind, const char *reason,
                          const char *fmt, va_list ap) __attribute__((format(printf, 4, 0)));
static void push_error_va(lua_State *L, const char *kind, const char *reason,
                          const char *fmt, va_list ap) {
  char buf[1024];
  vsnprintf(buf, sizeof buf, fmt, ap);
  lua_createtable(L, 0, 4);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, buf);
  lua_setfield(L, -2, "message");
  if (reason) {
    lua_pushstring(L, reason);
    lua_setfield(L, -2, "reason");
  }
  om_setmetatable(L, OM_ERROR_MT);
}

void om_push_error(lua_State *L, const char *kind, const char *reason, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  push_error_va(L, kind, reason, fmt, ap);
  va_end(ap);
}

int om_fail(lua_State *L, const char *kind, const char *reason, const char *fmt, ...) {
  va_list ap;
  lua_pushnil(L);
  va_start(ap, fmt);
  push_error_va(L, kind, reason, fmt, ap);
  va_end(ap);
  return 2;
}

const char *om_opt_string(lua_State *L, int t, const char *k, const char *def) {
  const char *s = def;
  int ty = om_getfield(L, t, k);
  if (ty == LUA_TSTRING) s = lua_tostring(L, -1);
  else if (ty != LUA_TNIL) luaL_error(L, "option '%s': expected a string, got %s", k, luaL_typename(L, -1));
  lua_pop(L, 1);  /* stays alive: read raw, so it is the table's own value */
  return s;
}

lua_Number om_opt_number(lua_State *L, int t, const char *k, lua_Number def) {
  lua_Number n = def;
  int ty = om_getfield(L, t, k);
  if (ty == LUA_TNUMBER) n = lua_tonumber(L, -1);
  else if (ty != LUA_TNIL) luaL_error(L, "option '%s': expected a number, got %s", k, luaL_typename(L, -1));
  lua_pop(L, 1);
  return n;
}

int om_opt_bool(lua_State *L, int t, const char *k, int def) {
  int b = def;
  int ty = om_getfield(L, t, k);
  if (ty == LUA_TBOOLEAN) b = lua_toboolean(L, -1);
  else if (ty != LUA_TNIL) luaL_error(L, "option '%s': expected a boolean, got %s", k, luaL_typename(L, -1));
  lua_pop(L, 1);
  return b;
}

double om_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The shared error metatable (registry "oauthmail.error"), made complete the
 * first time any module asks for it; left on the stack. */
void om_error_metatable(lua_State *L) {
  if (luaL_newmetatable(L, OM_ERROR_MT)) {
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
  }
}

/* Write all n bytes to a blocking descriptor (a file), through EINTR:
 * 0, or -1 with errno. */
int om_write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}
