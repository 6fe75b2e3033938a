/* resp.c — the Redis protocol engine (RESP2 and RESP3), socket-free.
 *
 * Lua feeds the bytes it received (eng:feed) and takes complete values out
 * (eng:next); commands are encoded by resp.encode. A value is taken in two
 * passes over the buffer: scan checks that a whole, well-formed value within
 * the limits (nesting depth, bulk length, elements per aggregate, line length,
 * buffered bytes) is there, then build turns it into Lua values. So a partial
 * reply builds nothing and a hostile one is refused before any table grows.
 *
 * Lua shapes: simple/bulk/verbatim string -> string; integer -> integer;
 * double -> number; big number -> string; boolean -> boolean; null -> the
 * resp.null sentinel; array/set/push -> sequence table; map -> table;
 * error/bulk error -> a table {message=} whose metatable is resp.error_mt.
 * Attributes are read and dropped. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include "core.h"

#define RESP_ENGINE "oauthmail.resp_engine"
#define RESP_ERROR "oauthmail.resp_error"

static const char null_tag = 0;   /* its address is resp.null */

typedef struct {
  char *p;
  size_t len, cap, rpos;   /* p[rpos..len) not yet taken */
  size_t max_depth, max_bulk, max_elements, max_line, max_buffer;
  int broken;              /* a protocol error was seen: nothing more is parsed */
  char why[160];
} resp_t;

enum { SCAN_MORE = 0, SCAN_OK = 1, SCAN_BAD = -1 };

static int bad(resp_t *e, const char *why) {
  snprintf(e->why, sizeof e->why, "%s", why);
  return SCAN_BAD;
}

/* The line starting at pos: its length without CRLF in *n. */
static int line_at(resp_t *e, size_t pos, size_t *n) {
  size_t avail = e->len - pos, lim = avail < e->max_line + 2 ? avail : e->max_line + 2, i;
  const char *s = e->p + pos;
  for (i = 0; i + 1 < lim; i++) {
    if (s[i] == '\r') {
      if (s[i + 1] != '\n') return bad(e, "a bare CR inside a reply line");
      *n = i;
      return SCAN_OK;
    }
    if (s[i] == '\n') return bad(e, "a bare LF inside a reply line");
  }
  if (lim > 0 && s[lim - 1] == '\n') return bad(e, "a bare LF inside a reply line");
  if (avail >= e->max_line + 2) {
    snprintf(e->why, sizeof e->why, "a reply line longer than %lu bytes (max_line)", (unsigned long)e->max_line);
    return SCAN_BAD;
  }
  return SCAN_MORE;
}

/* A decimal integer: an optional '-', 1 to 19 digits, nothing else. */
static int parse_int(const char *s, size_t n, long long *out) {
  size_t i = 0;
  int neg = 0;
  unsigned long long v = 0;
  if (n > 0 && s[0] == '-') { neg = 1; i = 1; }
  if (i == n || n - i > 19) return 0;
  for (; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return 0;
    v = v * 10 + (unsigned long long)(s[i] - '0');
  }
  if (!neg && v > 9223372036854775807ULL) return 0;
  if (neg && v > 9223372036854775808ULL) return 0;
  *out = neg ? (long long)(0 - v) : (long long)v;
  return 1;
}

static int is_double(const char *s, size_t n) {
  size_t i;
  if (n == 0 || n > 64) return 0;
  if ((n == 3 && memcmp(s, "inf", 3) == 0) || (n == 4 && memcmp(s, "-inf", 4) == 0)
      || (n == 3 && memcmp(s, "nan", 3) == 0)) return 1;
  for (i = 0; i < n; i++)
    if (!strchr("0123456789+-.eE", s[i])) return 0;
  return 1;
}

static int is_bignum(const char *s, size_t n) {
  size_t i = (n > 0 && s[0] == '-') ? 1 : 0;
  if (i == n) return 0;
  for (; i < n; i++) if (s[i] < '0' || s[i] > '9') return 0;
  return 1;
}

static int scan(resp_t *e, size_t pos, size_t depth, size_t *end);

/* count values one after the other from pos */
static int scan_many(resp_t *e, size_t pos, size_t count, size_t depth, size_t *end) {
  size_t i;
  for (i = 0; i < count; i++) {
    int r = scan(e, pos, depth, &pos);
    if (r != SCAN_OK) return r;
  }
  *end = pos;
  return SCAN_OK;
}

static int scan(resp_t *e, size_t pos, size_t depth, size_t *end) {
  size_t n, body;
  long long v;
  int r;
  char t;
  if (depth > e->max_depth) {
    snprintf(e->why, sizeof e->why, "values nested deeper than %lu levels (max_depth)", (unsigned long)e->max_depth);
    return SCAN_BAD;
  }
  if (pos >= e->len) return SCAN_MORE;
  t = e->p[pos];
  if (!strchr("+-:,(#_$!=*~>%|", t) || t == 0) {
    if (t == '\r' || t == '\n') return bad(e, "an empty reply");
    snprintf(e->why, sizeof e->why, "an unknown reply type byte (0x%02x)", (unsigned)(unsigned char)t);
    return SCAN_BAD;
  }
  r = line_at(e, pos + 1, &n);
  if (r != SCAN_OK) return r;
  body = pos + 1;
  switch (t) {
  case '+': case '-':
    *end = body + n + 2;
    return SCAN_OK;
  case ':':
    if (!parse_int(e->p + body, n, &v)) return bad(e, "a malformed integer");
    *end = body + n + 2;
    return SCAN_OK;
  case ',':
    if (!is_double(e->p + body, n)) return bad(e, "a malformed double");
    *end = body + n + 2;
    return SCAN_OK;
  case '(':
    if (!is_bignum(e->p + body, n)) return bad(e, "a malformed big number");
    *end = body + n + 2;
    return SCAN_OK;
  case '#':
    if (n != 1 || (e->p[body] != 't' && e->p[body] != 'f')) return bad(e, "a malformed boolean");
    *end = body + n + 2;
    return SCAN_OK;
  case '_':
    if (n != 0) return bad(e, "a malformed null");
    *end = body + 2;
    return SCAN_OK;
  case '$': case '!': case '=': {
    size_t data = body + n + 2;
    if (!parse_int(e->p + body, n, &v) || v < -1 || (v == -1 && t != '$'))
      return bad(e, "a malformed bulk string length");
    if (v == -1) { *end = data; return SCAN_OK; }
    if ((unsigned long long)v > e->max_bulk) {
      snprintf(e->why, sizeof e->why, "a bulk string of %lld bytes, over %lu (max_bulk)", v, (unsigned long)e->max_bulk);
      return SCAN_BAD;
    }
    if (t == '=' && v < 4) return bad(e, "a malformed verbatim string");
    if (e->len - data < (size_t)v + 2) return SCAN_MORE;
    if (e->p[data + (size_t)v] != '\r' || e->p[data + (size_t)v + 1] != '\n')
      return bad(e, "a bulk string not followed by CRLF");
    if (t == '=' && e->p[data + 3] != ':') return bad(e, "a malformed verbatim string");
    *end = data + (size_t)v + 2;
    return SCAN_OK;
  }
  case '*': case '~': case '>': case '%': case '|': {
    unsigned long long count;
    if (!parse_int(e->p + body, n, &v) || v < -1 || (v == -1 && t != '*'))
      return bad(e, "a malformed aggregate length");
    if (v == -1) { *end = body + n + 2; return SCAN_OK; }
    if ((unsigned long long)v > e->max_elements) {
      snprintf(e->why, sizeof e->why, "an aggregate of %lld elements, over %lu (max_elements)", v, (unsigned long)e->max_elements);
      return SCAN_BAD;
    }
    count = (unsigned long long)v * ((t == '%' || t == '|') ? 2 : 1);
    r = scan_many(e, body + n + 2, (size_t)count, depth + 1, end);
    if (r != SCAN_OK || t != '|') return r;
    /* an attribute describes the value that follows it */
    return scan(e, *end, depth, end);
  }
  default:
    return bad(e, "an unknown reply type");
  }
}

static void push_error_value(lua_State *L, const char *s, size_t n) {
  lua_createtable(L, 0, 1);
  lua_pushlstring(L, s, n);
  lua_setfield(L, -2, "message");
  om_setmetatable(L, RESP_ERROR);
}

/* Builds the value scan accepted at pos; returns the position after it. */
static size_t build(lua_State *L, resp_t *e, size_t pos) {
  char t = e->p[pos];
  size_t body = pos + 1, n = 0;
  long long v = 0;
  while (e->p[body + n] != '\r') n++;
  luaL_checkstack(L, 4, "resp: values nested too deep");
  switch (t) {
  case '+': lua_pushlstring(L, e->p + body, n); break;
  case '-': push_error_value(L, e->p + body, n); break;
  case '(': lua_pushlstring(L, e->p + body, n); break;
  case ':':
    parse_int(e->p + body, n, &v);
#if LUA_VERSION_NUM >= 503
    lua_pushinteger(L, (lua_Integer)v);
#else
    lua_pushnumber(L, (lua_Number)v);
#endif
    break;
  case ',': {
    char tmp[72];
    memcpy(tmp, e->p + body, n);
    tmp[n] = 0;
    if (strcmp(tmp, "inf") == 0) lua_pushnumber(L, HUGE_VAL);
    else if (strcmp(tmp, "-inf") == 0) lua_pushnumber(L, -HUGE_VAL);
    else if (strcmp(tmp, "nan") == 0) lua_pushnumber(L, NAN);
    else lua_pushnumber(L, strtod(tmp, NULL));
    break;
  }
  case '#': lua_pushboolean(L, e->p[body] == 't'); break;
  case '_': lua_pushlightuserdata(L, (void *)&null_tag); break;
  case '$': case '!': case '=': {
    size_t data = body + n + 2;
    parse_int(e->p + body, n, &v);
    if (v < 0) { lua_pushlightuserdata(L, (void *)&null_tag); return data; }
    if (t == '!') push_error_value(L, e->p + data, (size_t)v);
    else if (t == '=') lua_pushlstring(L, e->p + data + 4, (size_t)v - 4);
    else lua_pushlstring(L, e->p + data, (size_t)v);
    return data + (size_t)v + 2;
  }
  default: {   /* aggregates */
    size_t i, next = body + n + 2;
    parse_int(e->p + body, n, &v);
    if (v < 0) { lua_pushlightuserdata(L, (void *)&null_tag); return next; }
    if (t == '|') {   /* drop the attribute, build what it describes */
      scan_many(e, next, (size_t)v * 2, 1, &next);
      return build(L, e, next);
    }
    if (t == '%') {
      lua_createtable(L, 0, v > 64 ? 64 : (int)v);
      for (i = 0; i < (size_t)v; i++) {
        next = build(L, e, next);
        next = build(L, e, next);
        if (lua_type(L, -2) == LUA_TNUMBER && lua_tonumber(L, -2) != lua_tonumber(L, -2)) lua_pop(L, 2);
        else lua_rawset(L, -3);
      }
    } else {
      lua_createtable(L, v > 1024 ? 1024 : (int)v, 0);
      for (i = 0; i < (size_t)v; i++) {
        next = build(L, e, next);
        lua_rawseti(L, -2, (int)i + 1);
      }
    }
    return next;
  }
  }
  return body + n + 2;
}

/* ---- the engine object ------------------------------------------------ */

static resp_t *check(lua_State *L) {
  resp_t *e = luaL_checkudata(L, 1, RESP_ENGINE);
  if (!e->max_line) luaL_error(L, "resp engine: used after close");
  return e;
}

static void wipe(resp_t *e) {
  if (e->p) {
    OPENSSL_cleanse(e->p, e->cap);
    free(e->p);
  }
  e->p = NULL;
  e->len = e->cap = e->rpos = 0;
}

static size_t opt_size(lua_State *L, const char *k, size_t def, size_t lo, size_t hi) {
  lua_Number v;
  if (lua_type(L, 1) != LUA_TTABLE) return def;
  v = om_opt_number(L, 1, k, (lua_Number)def);
  if (!(v >= (lua_Number)lo && v <= (lua_Number)hi) || v != floor(v))
    luaL_error(L, "resp.engine: '%s' must be an integer from %d to %d", k, (int)lo, (int)hi);
  return (size_t)v;
}

/* resp.engine{max_depth=16, max_bulk=16 MiB, max_elements=1e6, max_line=64 KiB, max_buffer=64 MiB} */
static int resp_engine(lua_State *L) {
  resp_t *e;
  size_t depth = opt_size(L, "max_depth", 16, 1, 64);
  size_t bulk = opt_size(L, "max_bulk", 16u << 20, 0, 512u << 20);
  size_t elems = opt_size(L, "max_elements", 1000000, 0, 100000000);
  size_t line = opt_size(L, "max_line", 65536, 16, 1u << 20);
  size_t buffer = opt_size(L, "max_buffer", 64u << 20, 64, 1u << 30);
  e = lua_newuserdata(L, sizeof *e);
  memset(e, 0, sizeof *e);
  e->max_depth = depth;
  e->max_bulk = bulk;
  e->max_elements = elems;
  e->max_line = line;
  e->max_buffer = buffer;
  om_setmetatable(L, RESP_ENGINE);
  return 1;
}

/* eng:feed(bytes) -> true | nil, err (more unparsed bytes than max_buffer) */
static int eng_feed(lua_State *L) {
  resp_t *e = check(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  if (e->broken) return om_fail(L, "network", "protocol", "redis protocol error: %s", e->why);
  if (n > e->max_buffer || e->len - e->rpos > e->max_buffer - n) {
    e->broken = 1;
    snprintf(e->why, sizeof e->why, "a reply larger than %lu bytes", (unsigned long)e->max_buffer);
    return om_fail(L, "network", "protocol", "redis protocol error: %s", e->why);
  }
  if (e->rpos > 0 && (e->rpos == e->len || e->rpos > e->cap / 2)) {
    memmove(e->p, e->p + e->rpos, e->len - e->rpos);
    e->len -= e->rpos;
    OPENSSL_cleanse(e->p + e->len, e->rpos < e->cap - e->len ? e->rpos : e->cap - e->len);
    e->rpos = 0;
  }
  if (e->len + n > e->cap) {
    size_t ncap = e->cap ? e->cap : 4096;
    char *np;
    while (ncap < e->len + n) ncap *= 2;
    np = malloc(ncap);
    if (!np) return luaL_error(L, "resp engine: out of memory");
    if (e->p) memcpy(np, e->p, e->len);
    if (e->p) { OPENSSL_cleanse(e->p, e->cap); free(e->p); }
    e->p = np;
    e->cap = ncap;
  }
  if (n > 0) {   /* an empty feed before any data: p is still NULL */
    memcpy(e->p + e->len, s, n);
    e->len += n;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* eng:next() -> true, value, kind ("error"|"push"|nil) | false (need more bytes) | nil, err */
static int eng_next(lua_State *L) {
  resp_t *e = check(L);
  size_t end = 0;
  int r;
  char t;
  if (e->broken) return om_fail(L, "network", "protocol", "redis protocol error: %s", e->why);
  r = scan(e, e->rpos, 0, &end);
  if (r == SCAN_MORE) { lua_pushboolean(L, 0); return 1; }
  if (r == SCAN_BAD) {
    e->broken = 1;
    return om_fail(L, "network", "protocol", "redis protocol error: %s", e->why);
  }
  lua_pushboolean(L, 1);
  t = e->p[e->rpos];
  {
    size_t pos = e->rpos;
    while (t == '|') {   /* the kind is that of the value an attribute describes */
      long long v = 0;
      size_t n = 0, body = pos + 1;
      while (e->p[body + n] != '\r') n++;
      parse_int(e->p + body, n, &v);
      scan_many(e, body + n + 2, (size_t)v * 2, 1, &pos);
      t = e->p[pos];
    }
  }
  build(L, e, e->rpos);
  e->rpos = end;
  if (t == '-' || t == '!') lua_pushliteral(L, "error");
  else if (t == '>') lua_pushliteral(L, "push");
  else lua_pushnil(L);
  return 3;
}

static int eng_pending(lua_State *L) {
  resp_t *e = check(L);
  lua_pushinteger(L, (lua_Integer)(e->len - e->rpos));
  return 1;
}

static int eng_reset(lua_State *L) {
  resp_t *e = check(L);
  wipe(e);
  e->broken = 0;
  e->why[0] = 0;
  return 0;
}

static int eng_close(lua_State *L) {
  resp_t *e = luaL_checkudata(L, 1, RESP_ENGINE);
  wipe(e);
  e->max_line = 0;
  return 0;
}

static int eng_tostring(lua_State *L) {
  resp_t *e = luaL_checkudata(L, 1, RESP_ENGINE);
  lua_pushfstring(L, "oauthmail.resp_engine (%s)", e->max_line ? (e->broken ? "broken" : "open") : "closed");
  return 1;
}

/* ---- the encoder ------------------------------------------------------ */

/* One argument as a bulk string. The value is read from the argument table,
 * which anchors it, so nothing is left on the stack while the buffer is used. */
static void add_arg(lua_State *L, luaL_Buffer *b, int i) {
  size_t n = 0;
  const char *s = NULL;
  char num[64];
  char head[32];
  int ty;
  lua_rawgeti(L, 1, i);
  ty = lua_type(L, -1);
  if (ty == LUA_TNUMBER) {
#if LUA_VERSION_NUM >= 503
    if (lua_isinteger(L, -1)) snprintf(num, sizeof num, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, -1));
    else
#endif
    {
      lua_Number x = lua_tonumber(L, -1);
      if (x != x || x == HUGE_VAL || x == -HUGE_VAL) {
        luaL_error(L, "resp.encode: argument %d is not a finite number", i);
        return;
      }
      if (x == floor(x) && fabs(x) < 9007199254740992.0) snprintf(num, sizeof num, "%.0f", (double)x);
      else snprintf(num, sizeof num, "%.17g", (double)x);
    }
    s = num;
    n = strlen(num);
  } else if (ty == LUA_TSTRING) {
    s = lua_tolstring(L, -1, &n);
  } else {
    luaL_error(L, "resp.encode: argument %d must be a string or a number, got %s", i, luaL_typename(L, -1));
    return;
  }
  lua_pop(L, 1);
  snprintf(head, sizeof head, "$%lu\r\n", (unsigned long)n);
  luaL_addstring(b, head);
  luaL_addlstring(b, s, n);
  luaL_addlstring(b, "\r\n", 2);
}

/* resp.encode(args [, n]) -> one command as a RESP array of bulk strings */
static int resp_encode(lua_State *L) {
  luaL_Buffer b;
  lua_Integer i, n;
  char head[32];
  luaL_checktype(L, 1, LUA_TTABLE);
  n = luaL_optinteger(L, 2, (lua_Integer)om_rawlen(L, 1));
  luaL_argcheck(L, n >= 1 && n <= 1000000, 2, "a command has 1 to 1000000 arguments");
  lua_settop(L, 1);
  luaL_buffinit(L, &b);
  snprintf(head, sizeof head, "*%ld\r\n", (long)n);
  luaL_addstring(&b, head);
  for (i = 1; i <= n; i++) add_arg(L, &b, (int)i);
  luaL_pushresult(&b);
  return 1;
}

static int resp_is_error(lua_State *L) {
  int r = 0;
  if (lua_type(L, 1) == LUA_TTABLE && lua_getmetatable(L, 1)) {
    luaL_getmetatable(L, RESP_ERROR);
    r = lua_rawequal(L, -1, -2);
  }
  lua_pushboolean(L, r);
  return 1;
}

static const luaL_Reg methods[] = {
  { "feed", eng_feed },
  { "next", eng_next },
  { "pending", eng_pending },
  { "reset", eng_reset },
  { "close", eng_close },
  { NULL, NULL }
};

static const luaL_Reg metamethods[] = {
  { "__gc", eng_close },
  { "__close", eng_close },
  { "__tostring", eng_tostring },
  { NULL, NULL }
};

static const luaL_Reg functions[] = {
  { "engine", resp_engine },
  { "encode", resp_encode },
  { "is_error", resp_is_error },
  { NULL, NULL }
};

void om_resp_open(lua_State *L) {
  if (luaL_newmetatable(L, RESP_ENGINE)) {
    om_setfuncs(L, metamethods);
    om_newlib(L, methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  luaL_newmetatable(L, RESP_ERROR);
  lua_pushliteral(L, "redis_error");
  lua_setfield(L, -2, "__name");
  lua_setfield(L, -2, "error_mt");
  om_setfuncs(L, functions);
  lua_pushlightuserdata(L, (void *)&null_tag);
  lua_setfield(L, -2, "null");
}
