/* core.c — luaopen_oauthmail_core: builds the private module from one list of
 * primitive families (one C file each), on top of oauthmail.sys (sys.c: the
 * clock, poll, files, the error value), whose fields it carries. Two families
 * are modules of their own so that a short-lived process loads only what it
 * uses: oauthmail.sys needs no OpenSSL (a cached `oauthmail token` reads a
 * file), and oauthmail.curl (http.c) alone links libcurl. */
#include "core.h"

static const struct {
  const char *name;
  void (*open)(lua_State *L);
} families[] = {
  { "conn", om_conn_open },
  { "crypto", om_crypto_open },
  { "smtp", om_smtp_open },
  { "resp", om_resp_open },
  { "spool", om_spool_open },
  { NULL, NULL }
};

__attribute__((visibility("default"))) int luaopen_oauthmail_core(lua_State *L);

int luaopen_oauthmail_core(lua_State *L) {
  int i;
  /* the OpenSSL-free primitives (sys.c) come first and stay the same values:
   * core.fs, core.poll, core.error_metatable... are oauthmail.sys's own */
  lua_getglobal(L, "require");
  lua_pushliteral(L, "oauthmail.sys");
  lua_call(L, 1, 1);
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, -3) != 0) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_settable(L, -4);
  }
  lua_remove(L, -2);
  for (i = 0; families[i].name; i++) {
    lua_newtable(L);
    families[i].open(L);
    lua_setfield(L, -2, families[i].name);
  }
  return 1;
}
