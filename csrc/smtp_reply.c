/* smtp_reply.c — the SMTP engine's replies: a reply is parsed only once it
 * is complete (multi-line, one code throughout, enhanced status codes, every
 * line and the whole reply bounded), EHLO's capabilities are read into a
 * table, and the reply goes to the handler of the state it answers. What a
 * malformed reply shows of itself is short, printable and redacted. */
#include <stdio.h>
#include <string.h>
#include "smtp_engine.h"

/* A short, printable, redacted copy of server text for error messages: long
 * base64-looking runs might echo a credential, so they are cut out. */
static void redact(const char *s, size_t n, char *dst, size_t dstsz) {
  size_t i = 0, o = 0;
  while (i < n && o + 12 < dstsz) {
    size_t run = 0;
    while (i + run < n && is_b64ish((unsigned char)s[i + run])) run++;
    if (run >= REDACT_RUN) {
      o += (size_t)snprintf(dst + o, dstsz - o, "<redacted>");
      i += run;
      continue;
    }
    if (run == 0) {
      unsigned char c = (unsigned char)s[i++];
      if (c >= 0x20 && c < 0x7f) dst[o++] = (char)c;
      else o += (size_t)snprintf(dst + o, dstsz - o, "\\x%02X", c);
    } else {
      size_t k = run < dstsz - o - 12 ? run : dstsz - o - 12;
      memcpy(dst + o, s + i, k);
      o += k;
      i += run;
    }
  }
  if (i < n && o + 4 < dstsz) { memcpy(dst + o, "...", 3); o += 3; }
  dst[o] = 0;
}

/* ---- reply parsing ---------------------------------------------------- */

/* "2.1.5 " at the start of s, whose class agrees with the reply code. */
static size_t enhanced_len(const char *s, size_t n, char cls) {
  size_t i = 0, part, dots = 0;
  if (n < 5 || s[0] != cls || s[1] != '.') return 0;
  i = 2;
  for (;;) {
    part = 0;
    while (i < n && s[i] >= '0' && s[i] <= '9' && part < 3) { i++; part++; }
    if (part == 0) return 0;
    if (dots == 1) break;
    if (i >= n || s[i] != '.') return 0;
    i++;
    dots++;
  }
  if (i < n && s[i] != ' ') return 0;
  return i;
}

/* EHLO lines after the first: KEYWORD[ params]. Builds the caps table on the
 * stack top and sets the engine's flags. */
static void parse_caps(lua_State *L, engine_t *e, int lines_idx, int nlines) {
  int i, caps_idx;
  lua_newtable(L);
  caps_idx = lua_gettop(L);
  e->caps = 0;
  for (i = 2; i <= nlines; i++) {
    size_t n, kl = 0, j;
    const char *s, *p;
    char key[64];
    lua_rawgeti(L, lines_idx, i);
    s = lua_tolstring(L, -1, &n);
    while (kl < n && s[kl] != ' ' && s[kl] != '=' && kl < sizeof key - 1) {
      char c = s[kl];
      key[kl++] = (c >= 'a' && c <= 'z') ? (char)(c - 32) : c;
    }
    key[kl] = 0;
    p = s + kl;
    while (p < s + n && (*p == ' ' || *p == '=')) p++;
    if (kl == 0) { lua_pop(L, 1); continue; }
    if (caps_keyword(key, kl, "AUTH")) {
      /* union of "AUTH a b" and the old "AUTH=a b" form */
      om_getfield(L, caps_idx, "AUTH");
      if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_setfield(L, caps_idx, "AUTH");
      }
      while (p < s + n) {
        char mech[64];
        size_t ml = 0;
        while (p < s + n && *p == ' ') p++;
        while (p < s + n && *p != ' ') {
          if (ml < sizeof mech - 1) mech[ml++] = (*p >= 'a' && *p <= 'z') ? (char)(*p - 32) : *p;
          p++;
        }
        if (ml) {
          lua_pushlstring(L, mech, ml);
          lua_pushboolean(L, 1);
          lua_rawset(L, -3);
        }
      }
      lua_pop(L, 1);
    } else if (caps_keyword(key, kl, "SIZE")) {
      lua_Integer v = 0;
      /* an integer on every Lua (no "35882577.0"); absurd values saturate */
      for (j = 0; p + j < s + n && p[j] >= '0' && p[j] <= '9'; j++)
        if (j < 15) v = v * 10 + (p[j] - '0');
      if (j) lua_pushinteger(L, v);
      else lua_pushboolean(L, 1);
      lua_setfield(L, caps_idx, "SIZE");
    } else {
      if (caps_keyword(key, kl, "PIPELINING")) e->caps |= CAP_PIPELINING;
      else if (caps_keyword(key, kl, "8BITMIME")) e->caps |= CAP_8BITMIME;
      else if (caps_keyword(key, kl, "SMTPUTF8")) e->caps |= CAP_SMTPUTF8;
      else if (caps_keyword(key, kl, "CHUNKING")) e->caps |= CAP_CHUNKING;
      else if (caps_keyword(key, kl, "STARTTLS")) e->caps |= CAP_STARTTLS;
      else if (caps_keyword(key, kl, "ENHANCEDSTATUSCODES")) e->caps |= CAP_ENHANCED;
      /* the key with its length: "AUTH\0x" must not become "AUTH" */
      lua_pushlstring(L, key, kl);
      if (p < s + n) lua_pushlstring(L, p, (size_t)(s + n - p));
      else lua_pushboolean(L, 1);
      lua_rawset(L, caps_idx);
    }
    lua_pop(L, 1);
  }
}

/* ---- per-state reply handlers ------------------------------------------
 * Each gets the reply table on the stack top (code, text, lines already set)
 * and decides how the head of the queue moves. */

/* raw/rawlen: the first line's text as received, unredacted (a challenge). */
typedef const char *(*handler_fn)(lua_State *L, engine_t *e, int code, int reply_idx,
                                  const char *raw, size_t rawlen);

static const char *h_plain(lua_State *L, engine_t *e, int code, int reply_idx,
                           const char *raw, size_t rawlen) {
  (void)code; (void)reply_idx; (void)raw; (void)rawlen;
  queue_pop(L, e);
  return NULL;
}

static const char *h_ehlo(lua_State *L, engine_t *e, int code, int reply_idx,
                          const char *raw, size_t rawlen) {
  if (code / 100 == 2) {
    int nlines;
    lua_getfield(L, reply_idx, "lines");
    nlines = (int)om_rawlen(L, -1);
    parse_caps(L, e, lua_gettop(L), nlines);
    lua_setfield(L, reply_idx, "caps");
    lua_pop(L, 1);
  }
  (void)raw; (void)rawlen;
  queue_pop(L, e);
  return NULL;
}

static const char *h_starttls(lua_State *L, engine_t *e, int code, int reply_idx,
                              const char *raw, size_t rawlen) {
  /* Bytes that arrived with the 220 were sent in the clear: they must never be
   * read as if they came over TLS (the CVE-2011-0411 injection). */
  if (code == 220 && e->in.len > e->rpos) {
    lua_pushboolean(L, 1);
    lua_setfield(L, reply_idx, "injected");
  }
  (void)raw; (void)rawlen;
  queue_pop(L, e);
  return NULL;
}

static handler_fn handler_for(smtp_state s) {
  switch (s) {
  case ST_EHLO: return h_ehlo;
  case ST_STARTTLS: return h_starttls;
  case ST_AUTH: case ST_AUTH_RESP: case ST_AUTH_USER: case ST_AUTH_PASS:
  case ST_AUTH_ERRACK: case ST_AUTH_CANCEL: return h_auth;
  default: return h_plain;
  }
}

static int reply_fail(lua_State *L, engine_t *e, const char *reason, const char *what,
                      const char *line, size_t n) {
  char red[200];
  size_t avail = (size_t)(e->in.p + e->in.len - line);
  if (n > avail) n = avail;  /* never show more than what was received */
  if (in_auth(e)) {
    redact_line(L, e, line, n);
    line = e->red.p;
    n = e->red.len;
  }
  redact(line, n, red, sizeof red);
  trace_f(L, e, "info", "%s: '%s'", what, red);
  om_fail(L, "smtp", reason, "%s from the server: '%s'", what, red);
  lua_pushstring(L, red);
  lua_setfield(L, -2, "text");
  lua_pushboolean(L, 0);
  lua_setfield(L, -2, "retryable");
  return 2;
}

/* Is a whole, well-formed reply at rpos? 1: yes (its code, line count and
 * end offset are set); 0: more bytes are needed; 2: it is malformed or too
 * long, and nil, err are pushed. */
int reply_scan(lua_State *L, engine_t *e, int *codep, size_t *nlinesp, size_t *endp) {
  size_t pos = e->rpos, nlines = 0;
  int code = 0;
  /* Nothing unparsed: wait for bytes. Before the first feed in.p is NULL,
   * and even NULL + 0 is undefined behaviour in C. */
  if (e->rpos >= e->in.len) return 0;
  for (;;) {
    const char *line = e->in.p + pos, *nl;
    size_t avail = e->in.len - pos, ll, scan = avail < e->max_line + 2 ? avail : e->max_line + 2;
    int c;
    nl = avail ? memchr(line, '\n', scan) : NULL;
    if (!nl) {
      if (avail > e->max_line + 1)
        return reply_fail(L, e, "too_long", "reply line too long", line, avail < 120 ? avail : 120);
      if (pos - e->rpos + avail > e->max_reply)
        return reply_fail(L, e, "too_long", "reply too long", e->in.p + e->rpos, 120);
      return 0;
    }
    ll = (size_t)(nl - line);
    if (ll && line[ll - 1] == '\r') ll--;
    if (ll > e->max_line) return reply_fail(L, e, "too_long", "reply line too long", line, ll < 120 ? ll : 120);
    if (ll < 3 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '9' ||
        line[2] < '0' || line[2] > '9' || (ll > 3 && line[3] != ' ' && line[3] != '-'))
      return reply_fail(L, e, "malformed", "malformed reply", line, ll);
    c = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    if (nlines == 0) code = c;
    else if (c != code) return reply_fail(L, e, "malformed", "multi-line reply changes its code", line, ll);
    nlines++;
    pos = (size_t)(nl - e->in.p) + 1;
    if (pos - e->rpos > e->max_reply) return reply_fail(L, e, "too_long", "reply too long", e->in.p + e->rpos, 120);
    if (ll == 3 || line[3] == ' ') break;
  }
  *codep = code;
  *nlinesp = nlines;
  *endp = pos;
  return 1;
}

/* The scanned reply at rpos, traced line by line. With `table`, pushes
 * {code=, enhanced=, text=, lines=, command=} (lines and command only with
 * `full`; table = 2: sized for those three fields alone); raw/rawlen get the
 * first line's text as received, unredacted. */
void reply_take(lua_State *L, engine_t *e, int code, size_t nlines, int table, int full,
                const char **rawp, size_t *rawlenp) {
  char cls = (char)('0' + code / 100);
  int reply_idx = 0, lines_idx = 0, auth = in_auth(e);
  luaL_Buffer text;
  char enh[16];
  size_t enh_len = 0, p = e->rpos, i;
  if (table) {
    /* a receipt gets accepted and rejected besides; a compact one nothing */
    lua_createtable(L, 0, full ? 6 : table > 1 ? 3 : 5);
    reply_idx = lua_gettop(L);
    if (full) {
      lua_createtable(L, (int)nlines, 0);
      lines_idx = lua_gettop(L);
    }
    luaL_buffinit(L, &text);
  }
  for (i = 1; i <= nlines; i++) {
    const char *line = e->in.p + p, *nl = memchr(line, '\n', e->in.len - p);
    size_t ll = (size_t)(nl - line), tl, el;
    const char *t;
    if (ll && line[ll - 1] == '\r') ll--;
    p = (size_t)(nl - e->in.p) + 1;
    if (i == 1 && rawp) {
      *rawp = ll > 4 ? line + 4 : line + ll;
      *rawlenp = ll > 4 ? ll - 4 : 0;
    }
    if (auth) {
      redact_line(L, e, line, ll);
      line = e->red.p;
      ll = e->red.len;
    }
    trace_add(L, e, "recv", line, ll);
    if (!table) continue;
    t = ll > 4 ? line + 4 : line + ll;
    tl = ll > 4 ? ll - 4 : 0;
    if (full) {
      lua_pushlstring(L, t, tl);
      lua_rawseti(L, lines_idx, (int)i);
    }
    el = enhanced_len(t, tl, cls);
    if (el && el < sizeof enh && (!enh_len || (el == enh_len && memcmp(t, enh, el) == 0))) {
      if (!enh_len) {
        memcpy(enh, t, el);
        enh_len = el;
        lua_pushlstring(L, t, el);
        lua_setfield(L, reply_idx, "enhanced");
      }
      t += el;
      tl -= el;
      while (tl && *t == ' ') { t++; tl--; }
    }
    if (i > 1) luaL_addchar(&text, '\n');
    luaL_addlstring(&text, t, tl);
  }
  if (!table) return;
  luaL_pushresult(&text);
  lua_setfield(L, reply_idx, "text");
  if (full) {
    lua_setfield(L, reply_idx, "lines");
    lua_pushstring(L, state_names[e->state]);
    lua_setfield(L, reply_idx, "command");
  }
  lua_pushinteger(L, code);
  lua_setfield(L, reply_idx, "code");
}

/* The reply's bytes are consumed; they stay where they are until the next
 * feed, so a raw pointer into them remains valid. */
void reply_consumed(engine_t *e, size_t end) {
  e->rpos = end;
  if (e->rpos == e->in.len) e->rpos = e->in.len = 0;
}

/* eng:reply() -> reply | nil (needs more bytes) | nil, err (malformed/too long) */
int eng_reply(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t nlines, end, rawlen = 0;
  int code, reply_idx, got;
  const char *raw = NULL, *why;
  got = reply_scan(L, e, &code, &nlines, &end);
  if (got != 1) return got;
  reply_take(L, e, code, nlines, 1, 1, &raw, &rawlen);
  reply_idx = lua_gettop(L);
  reply_consumed(e, end);
  why = handler_for(e->state)(L, e, code, reply_idx, raw, rawlen);
  if (why) {
    lua_settop(L, reply_idx - 1);
    trace_f(L, e, "info", "protocol error: %s", why);
    om_fail(L, "smtp", "malformed", "protocol error from the server: %s", why);
    lua_pushinteger(L, code);
    lua_setfield(L, -2, "code");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "retryable");
    return 2;
  }
  lua_settop(L, reply_idx);
  return 1;
}
