/* compat.h — the one place where Lua 5.1/LuaJIT, 5.3 and 5.4 differ.
 * The code is written against the 5.3/5.4 API; what 5.1 lacks is backported
 * here under om_ names so nothing collides with a system compat library. */
#ifndef OAUTHMAIL_COMPAT_H
#define OAUTHMAIL_COMPAT_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#if LUA_VERSION_NUM < 502
#  define om_setfuncs(L, l) luaL_register((L), NULL, (l))
#  define om_newlib(L, l) (lua_newtable(L), luaL_register((L), NULL, (l)))
#  define om_rawlen(L, i) lua_objlen((L), (i))
#  define om_setmetatable(L, tname) (luaL_getmetatable((L), (tname)), lua_setmetatable((L), -2))
static inline void *om_testudata(lua_State *L, int i, const char *tname) {
  void *p = lua_touserdata(L, i);
  if (p == NULL || !lua_getmetatable(L, i)) return NULL;
  luaL_getmetatable(L, tname);
  if (!lua_rawequal(L, -1, -2)) p = NULL;
  lua_pop(L, 2);
  return p;
}
#else
#  define om_setfuncs(L, l) luaL_setfuncs((L), (l), 0)
#  define om_newlib(L, l) (lua_newtable(L), luaL_setfuncs((L), (l), 0))
#  define om_rawlen(L, i) lua_rawlen((L), (i))
#  define om_setmetatable(L, tname) luaL_setmetatable((L), (tname))
#  define om_testudata(L, i, tname) luaL_testudata((L), (i), (tname))
#endif

/* Read an option field raw and return its type. Raw on purpose: no __index
 * function can run, so a string read here stays anchored in the argument
 * table while C holds its pointer (a metamethod could return a fresh string
 * that the next allocation collects). Option tables are plain tables. */
static inline int om_getfield(lua_State *L, int idx, const char *k) {
  if (idx < 0 && idx > LUA_REGISTRYINDEX) idx = lua_gettop(L) + idx + 1;
  lua_pushstring(L, k);
  lua_rawget(L, idx);
  return lua_type(L, -1);
}

#endif
