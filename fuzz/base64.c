/* fuzz/base64.c — libFuzzer target: the base64/base64url codec (csrc/b64.c)
 * directly and through core.crypto's Lua functions, checked both ways:
 *   decode(s) ok  => encode(decode(s)) == s (base64url: minus its padding)
 *   encode(b)     => decode(encode(b)) == b, and standard base64 is what
 *                    OpenSSL's EVP_EncodeBlock writes
 * and the Lua functions agree with the C codec, value for value. */
#include <string.h>
#include <openssl/evp.h>
#include "lua_harness.h"
#include "b64.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "base64 finding: %s (line %d)\n", #c, __LINE__); abort(); } } while (0)

/* core.crypto[fn](s) -> pushes its one or two results; returns the count */
static int call(lua_State *L, const char *fn, const char *s, size_t n) {
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.crypto");
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  lua_pushlstring(L, s, n);
  if (lua_pcall(L, 1, LUA_MULTRET, 0) != 0) {
    fprintf(stderr, "base64 finding: crypto.%s raised: %s\n", fn, lua_tostring(L, -1));
    abort();
  }
  return lua_gettop(L) - top;
}

static void round_trip_text(lua_State *L, const char *s, size_t n, int url) {
  size_t max = om_b64_decoded_max(n), len, pos, en, i, bare = n;
  unsigned char *out = malloc(max);
  char *again;
  om_b64_status st = om_b64_decode(s, n, url, out, &len, &pos);
  int nres = call(L, url ? "b64url_decode" : "b64decode", s, n);
  if (st == OM_B64_OK) {
    size_t ln;
    const char *lv;
    CHECK(nres == 1 && lua_type(L, -1) == LUA_TSTRING);
    lv = lua_tolstring(L, -1, &ln);
    CHECK(ln == len && memcmp(lv, out, len) == 0);
    en = om_b64_encoded_len(len, url);
    again = malloc(en + 1);
    om_b64_encode(out, len, url, again);
    if (url) while (bare > 0 && s[bare - 1] == '=') bare--;
    CHECK(en == bare && memcmp(again, s, en) == 0);
    free(again);
  } else {
    CHECK(nres == 2 && lua_isnil(L, -2) && lua_istable(L, -1));
    CHECK(pos <= n);
    lua_getfield(L, -1, "message");
    {
      const char *m = lua_tostring(L, -1);
      CHECK(m && strstr(m, om_b64_reason(st)));
      for (i = 0; m[i]; i++) CHECK(m[i] >= 0x20 && m[i] < 0x7f);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, nres);
  free(out);
}

static void round_trip_bytes(lua_State *L, const unsigned char *b, size_t n, int url) {
  size_t en = om_b64_encoded_len(n, url), len, pos, ln;
  char *enc = malloc(en + 1);
  unsigned char *dec = malloc(om_b64_decoded_max(en));
  const char *lv;
  int nres;
  om_b64_encode(b, n, url, enc);
  if (!url && n <= 3 * 4096) {
    unsigned char *ref = malloc(en + 1);
    CHECK(EVP_EncodeBlock(ref, b, (int)n) == (int)en && memcmp(ref, enc, en) == 0);
    free(ref);
  }
  CHECK(om_b64_decode(enc, en, url, dec, &len, &pos) == OM_B64_OK);
  CHECK(len == n && memcmp(dec, b, n) == 0);
  nres = call(L, url ? "b64url_encode" : "b64encode", (const char *)b, n);
  CHECK(nres == 1);
  lv = lua_tolstring(L, -1, &ln);
  CHECK(ln == en && memcmp(lv, enc, en) == 0);
  lua_pop(L, 1);
  free(enc);
  free(dec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L;
  if (!harness_L) {
    harness_L = luaL_newstate();
    if (!harness_L) abort();
    luaL_openlibs(harness_L);
    luaL_requiref(harness_L, "oauthmail.sys", luaopen_oauthmail_sys, 0);
    lua_pop(harness_L, 1);
    luaL_requiref(harness_L, "oauthmail.core", luaopen_oauthmail_core, 0);
    lua_getfield(harness_L, -1, "crypto");
    lua_setfield(harness_L, LUA_REGISTRYINDEX, "fuzz.crypto");
    lua_pop(harness_L, 1);
  }
  L = harness_L;
  if (size == 0) return 0;
  /* the first byte picks the alphabet; the rest is both text and bytes */
  round_trip_text(L, (const char *)data + 1, size - 1, data[0] & 1);
  round_trip_bytes(L, data + 1, size - 1, data[0] & 1);
  harness_collect(L);
  return 0;
}
