/* smtp.c — the SMTP client engine (RFC 5321 with EHLO extensions, STARTTLS,
 * SASL XOAUTH2/OAUTHBEARER/PLAIN/LOGIN, PIPELINING, CHUNKING).
 *
 * The engine never touches a socket: Lua feeds it the bytes it received
 * (eng:feed) and takes the bytes to write (eng:output). Commands are queued
 * with the state whose reply they wait for; each complete reply is parsed
 * here (multi-line, enhanced codes, bounds), handed to the handler of the
 * state at the head of the queue, and returned to Lua as a table. Which
 * command comes next is Lua's business (lua/oauthmail/smtp.lua). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include "b64.h"
#include "core.h"

#define SMTP_ENGINE "oauthmail.smtp_engine"

/* One list of states; the enum and the names the trace prints come from it.
 * A state names the reply the engine waits for next. */
#define SMTP_STATES(X) \
  X(IDLE) X(GREETING) X(EHLO) X(HELO) X(STARTTLS) \
  X(AUTH) X(AUTH_RESP) X(AUTH_USER) X(AUTH_PASS) X(AUTH_ERRACK) X(AUTH_CANCEL) \
  X(MAIL) X(RCPT) X(DATA) X(DATA_END) X(BDAT) X(RSET) X(NOOP) X(QUIT)

#define X_ENUM(n) ST_##n,
#define X_NAME(n) #n,
typedef enum { SMTP_STATES(X_ENUM) ST_COUNT } smtp_state;
static const char *const state_names[] = { SMTP_STATES(X_NAME) NULL };

enum { MECH_NONE, MECH_XOAUTH2, MECH_OAUTHBEARER, MECH_PLAIN, MECH_LOGIN };
static const char *const mech_names[] = { "", "XOAUTH2", "OAUTHBEARER", "PLAIN", "LOGIN" };

#define CAP_PIPELINING  0x01
#define CAP_8BITMIME    0x02
#define CAP_SMTPUTF8    0x04
#define CAP_CHUNKING    0x08
#define CAP_STARTTLS    0x10
#define CAP_ENHANCED    0x20

#define MAX_PATH_LEN   256    /* RFC 5321 4.5.3.1.3, counting the <> */
#define MAX_CRED_LEN   65536  /* one user, host, token or password */
#define REDACT_RUN     20     /* base64-looking runs this long may be a credential */
#define MAX_QUEUE      200000 /* far above any sane pipelining window */

typedef struct {
  char *p;
  size_t len, cap;
} buf_t;

typedef struct {
  buf_t in;              /* received bytes; in.p[rpos..len) not yet parsed */
  size_t rpos;
  buf_t out;             /* bytes for Lua to write */
  int out_secret;        /* out holds a credential: wipe it once handed over */
  buf_t tmp;             /* BDAT staging */
  buf_t red;             /* a redacted reply line */
  unsigned char *queue;  /* states awaiting replies, head at qhead */
  size_t qhead, qlen, qcap;
  smtp_state state;
  size_t max_line, max_reply;
  int caps;
  int tx_utf8;           /* current MAIL used SMTPUTF8, so RCPT may be UTF-8 */
  /* SASL exchange in progress */
  int mech;
  char *blob;            /* raw SASL response: wiped with OPENSSL_cleanse */
  size_t blob_len;
  char *secret2;         /* the token or password: the LOGIN answer, and what
                            replies during the exchange are redacted of */
  size_t secret2_len;
  char *user;            /* for the redacted trace */
  /* DATA/BDAT filter, carried across chunks */
  int bol, after_cr;
  size_t body_bytes;
  int trace_ref;         /* table of pending trace events, or LUA_NOREF */
  int closed;
} engine_t;

/* ---- buffers ---------------------------------------------------------- */

/* Grows by copy, never realloc: the old block may hold a SASL response or a
 * server's echo of one, and realloc would free it unwiped. */
static void buf_reserve(lua_State *L, buf_t *b, size_t extra) {
  size_t need, ncap;
  char *np;
  if (extra > ((size_t)-1) / 4 - b->len) luaL_error(L, "smtp engine: buffer too large");
  need = b->len + extra;
  if (need <= b->cap) return;
  ncap = b->cap ? b->cap : 256;
  while (ncap < need) ncap *= 2;
  np = malloc(ncap);
  if (!np) luaL_error(L, "smtp engine: out of memory");
  if (b->p) {
    memcpy(np, b->p, b->len);
    OPENSSL_cleanse(b->p, b->cap);
    free(b->p);
  }
  b->p = np;
  b->cap = ncap;
}

static void buf_add(lua_State *L, buf_t *b, const void *s, size_t n) {
  if (n == 0) return;  /* b->p may be NULL: no arithmetic on it */
  buf_reserve(L, b, n);
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

static void buf_adds(lua_State *L, buf_t *b, const char *s) { buf_add(L, b, s, strlen(s)); }

static void buf_free(buf_t *b, int wipe) {
  if (b->p && wipe) OPENSSL_cleanse(b->p, b->cap);
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

static void secret_free(char **p, size_t *n) {
  if (*p) {
    OPENSSL_cleanse(*p, *n);
    free(*p);
  }
  *p = NULL;
  *n = 0;
}

static void sasl_clear(engine_t *e) {
  size_t ulen = e->user ? strlen(e->user) : 0;
  secret_free(&e->blob, &e->blob_len);
  secret_free(&e->secret2, &e->secret2_len);
  secret_free(&e->user, &ulen);
  e->mech = MECH_NONE;
}

/* ---- trace ------------------------------------------------------------ */

static void trace_add(lua_State *L, engine_t *e, const char *dir, const char *text, size_t n) {
  if (e->trace_ref == LUA_NOREF) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, e->trace_ref);
  lua_createtable(L, 0, 3);
  lua_pushliteral(L, "smtp");
  lua_setfield(L, -2, "proto");
  lua_pushstring(L, dir);
  lua_setfield(L, -2, "dir");
  lua_pushlstring(L, text, n);
  lua_setfield(L, -2, "text");
  lua_rawseti(L, -2, (int)om_rawlen(L, -2) + 1);
  lua_pop(L, 1);
}

static void trace_f(lua_State *L, engine_t *e, const char *dir, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void trace_f(lua_State *L, engine_t *e, const char *dir, const char *fmt, ...) {
  char line[1200];
  va_list ap;
  int n;
  if (e->trace_ref == LUA_NOREF) return;
  va_start(ap, fmt);
  n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  trace_add(L, e, dir, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* The one place the state changes, so every transition shows in the trace. */
static void set_state(lua_State *L, engine_t *e, smtp_state s) {
  if (e->state != s)
    trace_f(L, e, "info", "state %s -> %s", state_names[e->state], state_names[s]);
  e->state = s;
}

/* ---- the queue of awaited replies ------------------------------------- */

static void queue_push(lua_State *L, engine_t *e, smtp_state s) {
  if (e->qlen >= MAX_QUEUE) luaL_error(L, "smtp engine: more than %d commands awaiting replies", MAX_QUEUE);
  if (e->qhead + e->qlen >= e->qcap) {
    if (e->qhead > 0) {
      memmove(e->queue, e->queue + e->qhead, e->qlen);
      e->qhead = 0;
    }
    if (e->qlen >= e->qcap) {
      size_t ncap = e->qcap ? e->qcap * 2 : 64;
      unsigned char *nq = realloc(e->queue, ncap);
      if (!nq) luaL_error(L, "smtp engine: out of memory");
      e->queue = nq;
      e->qcap = ncap;
    }
  }
  e->queue[e->qhead + e->qlen++] = (unsigned char)s;
  if (e->qlen == 1) set_state(L, e, s);
}

static void queue_pop(lua_State *L, engine_t *e) {
  if (e->qlen > 0) {
    e->qhead++;
    e->qlen--;
  }
  if (e->qlen == 0) e->qhead = 0;
  set_state(L, e, e->qlen ? (smtp_state)e->queue[e->qhead] : ST_IDLE);
}

/* Replace the head's state: a SASL exchange moves on while staying in place. */
static void queue_head(lua_State *L, engine_t *e, smtp_state s) {
  if (e->qlen) e->queue[e->qhead] = (unsigned char)s;
  set_state(L, e, s);
}

/* ---- validation ------------------------------------------------------- */

static engine_t *check_engine(lua_State *L) {
  engine_t *e = (engine_t *)luaL_checkudata(L, 1, SMTP_ENGINE);
  if (e->closed) luaL_error(L, "attempt to use a closed smtp engine");
  return e;
}

static int has_8bit(const char *s, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) if ((unsigned char)s[i] >= 0x80) return 1;
  return 0;
}

/* Checks a path; strips one balanced pair of <> around it. Returns NULL when
 * fine, else the reason, for the caller's config error. */
static const char *address_problem(const char **s, size_t *n, int allow_empty, int utf8) {
  size_t i;
  if (*n >= 2 && (*s)[0] == '<' && (*s)[*n - 1] == '>') {
    (*s)++;
    *n -= 2;
  }
  if (*n == 0) return allow_empty ? NULL : "is empty";
  if (*n + 2 > MAX_PATH_LEN) return "is longer than 256 octets (counting its <>)";
  for (i = 0; i < *n; i++) {
    unsigned char c = (unsigned char)(*s)[i];
    if (c == '\r' || c == '\n') return "contains CR or LF";
    if (c == 0) return "contains NUL";
    if (c == '<' || c == '>') return "contains unbalanced '<' or '>'";
    if (c < 0x20 || c == 0x7f) return "contains a control character";
    if (c == ' ') return "contains a space";
  }
  if (!utf8 && has_8bit(*s, *n)) return "is not ASCII and the server does not offer SMTPUTF8";
  return NULL;
}

static const char *param_problem(const char *s, size_t n) {
  size_t i;
  if (n == 0) return "is empty";
  if (n > 500) return "is too long";
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '\r' || c == '\n') return "contains CR or LF";
    if (c == 0) return "contains NUL";
    if (c <= 0x20 || c >= 0x7f || c == '<' || c == '>') return "contains a space, '<', '>' or a non-printable character";
  }
  return NULL;
}

static int is_b64ish(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '+' || c == '/' || c == '=' || c == '-' || c == '_';
}

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

static int in_auth(const engine_t *e) {
  return e->state >= ST_AUTH && e->state <= ST_AUTH_CANCEL;
}

/* During a SASL exchange a server may quote what it got (sendmail's
 * '500 Command unrecognized: "AUTH XOAUTH2 dXNl..."'): copies s into e->red
 * with the secret in use and every base64-looking run of REDACT_RUN or more
 * replaced, for the trace, the reply table and errors alike. */
static void redact_line(lua_State *L, engine_t *e, const char *s, size_t n) {
  size_t i = 0, sl = e->secret2 ? e->secret2_len : 0;
  e->red.len = 0;
  buf_reserve(L, &e->red, n + 16);
  while (i < n) {
    size_t run = 0;
    if (sl >= 3 && n - i >= sl && memcmp(s + i, e->secret2, sl) == 0) {
      buf_adds(L, &e->red, "<redacted>");
      i += sl;
      continue;
    }
    while (i + run < n && is_b64ish((unsigned char)s[i + run])) run++;
    if (run >= REDACT_RUN) {
      buf_adds(L, &e->red, "<redacted>");
      i += run;
      continue;
    }
    /* one byte at a time, so a short secret inside a short run is seen */
    buf_add(L, &e->red, s + i, 1);
    i++;
  }
}

/* ---- base64 (the codec is csrc/b64.c) ---------------------------------- */

/* Appends base64(s) to b, encoding in place: a credential never passes
 * through a temporary block that an error could leave unwiped. */
static void buf_add_b64(lua_State *L, buf_t *b, const char *s, size_t n) {
  size_t el = om_b64_encoded_len(n, OM_B64_STD);
  buf_reserve(L, b, el);
  om_b64_encode((const unsigned char *)s, n, OM_B64_STD, b->p + b->len);
  b->len += el;
}

/* Strict RFC 4648 base64 (no spaces, padding only at the end, no stray bits),
 * decoded into a fresh Lua string on the stack; returns 0 when it is not. */
static int push_b64_decoded(lua_State *L, const char *s, size_t n) {
  size_t max = om_b64_decoded_max(n), len, pos;
  unsigned char *out = (unsigned char *)lua_newuserdata(L, max);
  if (om_b64_decode(s, n, OM_B64_STD, out, &len, &pos) != OM_B64_OK) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushlstring(L, (const char *)out, len);
  lua_remove(L, -2);
  return 1;
}

/* ---- output ----------------------------------------------------------- */

static void emit_line(lua_State *L, engine_t *e, const char *line, size_t n, const char *traced) {
  buf_reserve(L, &e->out, n + 2);
  memcpy(e->out.p + e->out.len, line, n);
  e->out.len += n;
  e->out.p[e->out.len++] = '\r';
  e->out.p[e->out.len++] = '\n';
  if (traced) trace_f(L, e, "send", "%s", traced);
  else trace_add(L, e, "send", line, n);
}

/* A command with one validated argument: VERB[ arg] */
static void emit_cmd(lua_State *L, engine_t *e, const char *verb, const char *arg, size_t n,
                     smtp_state s) {
  size_t vl = strlen(verb);
  buf_reserve(L, &e->out, vl + n + 3);
  memcpy(e->out.p + e->out.len, verb, vl);
  if (arg) {
    e->out.p[e->out.len + vl] = ' ';
    memcpy(e->out.p + e->out.len + vl + 1, arg, n);
    trace_add(L, e, "send", e->out.p + e->out.len, vl + 1 + n);
    e->out.len += vl + 1 + n;
  } else {
    trace_add(L, e, "send", verb, vl);
    e->out.len += vl;
  }
  e->out.p[e->out.len++] = '\r';
  e->out.p[e->out.len++] = '\n';
  queue_push(L, e, s);
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

static int caps_keyword(const char *k, size_t n, const char *name) {
  size_t i, m = strlen(name);
  if (n != m) return 0;
  for (i = 0; i < n; i++) {
    char c = k[i];
    if (c >= 'a' && c <= 'z') c = (char)(c - 32);
    if (c != name[i]) return 0;
  }
  return 1;
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

static void send_blob(lua_State *L, engine_t *e, const char *raw, size_t n, const char *traced) {
  buf_reserve(L, &e->out, 4 * ((n + 2) / 3) + 3);
  e->out_secret = 1;
  buf_add_b64(L, &e->out, raw, n);
  buf_add(L, &e->out, "\r\n", 2);
  trace_f(L, e, "send", "%s", traced);
}

static void trace_sasl(lua_State *L, engine_t *e, char *dst, size_t dstsz, const char *prefix) {
  switch (e->mech) {
  case MECH_XOAUTH2: case MECH_OAUTHBEARER:
    snprintf(dst, dstsz, "%suser=%s auth=Bearer <redacted>", prefix, e->user ? e->user : "");
    break;
  case MECH_PLAIN:
    snprintf(dst, dstsz, "%suser=%s password=<redacted>", prefix, e->user ? e->user : "");
    break;
  default:
    snprintf(dst, dstsz, "%s<redacted>", prefix);
  }
  (void)L;
}

/* Returns NULL, or why the reply breaks the protocol. */
static const char *h_auth(lua_State *L, engine_t *e, int code, int reply_idx,
                          const char *raw, size_t rawlen) {
  char traced[600];
  if (code != 334) {
    /* the exchange is over, whatever the outcome */
    sasl_clear(e);
    queue_pop(L, e);
    return NULL;
  }
  switch (e->state) {
  case ST_AUTH:  /* two-step: the server asks for the initial response */
    if (e->mech == MECH_LOGIN) {
      snprintf(traced, sizeof traced, "<LOGIN user: %s>", e->user ? e->user : "");
      send_blob(L, e, e->user, strlen(e->user), traced);
      queue_head(L, e, ST_AUTH_USER);
    } else {
      trace_sasl(L, e, traced, sizeof traced, "<SASL response: ");
      strncat(traced, ">", sizeof traced - strlen(traced) - 1);
      send_blob(L, e, e->blob, e->blob_len, traced);
      queue_head(L, e, ST_AUTH_RESP);
    }
    break;
  case ST_AUTH_USER:
    send_blob(L, e, e->secret2, e->secret2_len, "<LOGIN password: <redacted>>");
    queue_head(L, e, ST_AUTH_PASS);
    break;
  case ST_AUTH_RESP:
    if (e->mech == MECH_XOAUTH2 || e->mech == MECH_OAUTHBEARER) {
      /* RFC 7628 3.2.2 / Google's XOAUTH2: a 334 after the credentials is an
       * error challenge (base64 JSON); acknowledge it to get the final reply.
       * Whatever is not strict base64 is kept as opaque (redacted) text. */
      if (push_b64_decoded(L, raw, rawlen)) {
        size_t jl;
        const char *j = lua_tolstring(L, -1, &jl);
        trace_f(L, e, "info", "error challenge: %.*s", (int)(jl > 1000 ? 1000 : jl), j);
        lua_setfield(L, reply_idx, "challenge");
      } else {
        lua_getfield(L, reply_idx, "text");
        trace_f(L, e, "info", "error challenge is not base64: '%.200s'", lua_tostring(L, -1));
        lua_setfield(L, reply_idx, "challenge_text");
      }
      if (e->mech == MECH_OAUTHBEARER) emit_line(L, e, "AQ==", 4, "AQ== (^A: acknowledge the error challenge)");
      else emit_line(L, e, "", 0, "(empty line: acknowledge the error challenge)");
      queue_head(L, e, ST_AUTH_ERRACK);
      secret_free(&e->blob, &e->blob_len);
      break;
    }
    /* PLAIN has nothing more to say: a challenge where none may come is
     * cancelled (RFC 4954 4); the secret stays until the final reply, to
     * redact it should the server quote it */
    emit_line(L, e, "*", 1, NULL);
    queue_head(L, e, ST_AUTH_CANCEL);
    secret_free(&e->blob, &e->blob_len);
    break;
  default:
    /* after the password, the acknowledgement or the cancel nothing may be
     * asked: a server that keeps asking would keep us answering for ever */
    sasl_clear(e);
    queue_pop(L, e);
    return "a 334 challenge after the SASL exchange was over";
  }
  lua_pushboolean(L, 1);
  lua_setfield(L, reply_idx, "continue");
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

/* eng:reply() -> reply | nil (needs more bytes) | nil, err (malformed/too long) */
static int eng_reply(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t pos = e->rpos, nlines = 0;
  int code = 0, reply_idx, lines_idx;
  char cls = 0;
  luaL_Buffer text;
  char enh[16];
  size_t enh_len = 0;
  int auth = in_auth(e);
  const char *raw = NULL, *why;
  size_t rawlen = 0;
  /* Nothing unparsed: wait for bytes. Before the first feed in.p is NULL,
   * and even NULL + 0 is undefined behaviour in C. */
  if (e->rpos >= e->in.len) return 0;
  /* First pass: is a whole reply here, and is it well-formed? */
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
  /* Second pass: build the table. */
  cls = (char)('0' + code / 100);
  lua_createtable(L, 0, 6);
  reply_idx = lua_gettop(L);
  lua_createtable(L, (int)nlines, 0);
  lines_idx = lua_gettop(L);
  luaL_buffinit(L, &text);
  {
    size_t p = e->rpos, i;
    for (i = 1; i <= nlines; i++) {
      const char *line = e->in.p + p, *nl = memchr(line, '\n', e->in.len - p);
      size_t ll = (size_t)(nl - line), tl, el;
      const char *t;
      if (ll && line[ll - 1] == '\r') ll--;
      p = (size_t)(nl - e->in.p) + 1;
      if (i == 1) {
        raw = ll > 4 ? line + 4 : line + ll;
        rawlen = ll > 4 ? ll - 4 : 0;
      }
      if (auth) {
        redact_line(L, e, line, ll);
        line = e->red.p;
        ll = e->red.len;
      }
      trace_add(L, e, "recv", line, ll);
      t = ll > 4 ? line + 4 : line + ll;
      tl = ll > 4 ? ll - 4 : 0;
      lua_pushlstring(L, t, tl);
      lua_rawseti(L, lines_idx, (int)i);
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
  }
  luaL_pushresult(&text);
  lua_setfield(L, reply_idx, "text");
  lua_setfield(L, reply_idx, "lines");
  lua_pushinteger(L, code);
  lua_setfield(L, reply_idx, "code");
  lua_pushstring(L, state_names[e->state]);
  lua_setfield(L, reply_idx, "command");
  /* the bytes stay where they are until the next feed: raw remains valid */
  e->rpos = pos;
  if (e->rpos == e->in.len) e->rpos = e->in.len = 0;
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

/* ---- Lua methods: bytes in and out ------------------------------------ */

static int eng_feed(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  /* keep the unparsed tail only, so the buffer never grows without bound */
  if (e->rpos > 0 && e->rpos > e->in.len / 2) {
    memmove(e->in.p, e->in.p + e->rpos, e->in.len - e->rpos);
    e->in.len -= e->rpos;
    e->rpos = 0;
  }
  buf_add(L, &e->in, s, n);
  return 0;
}

static int eng_output(lua_State *L) {
  engine_t *e = check_engine(L);
  lua_pushlstring(L, e->out.p ? e->out.p : "", e->out.len);
  if (e->out_secret && e->out.p) OPENSSL_cleanse(e->out.p, e->out.len);
  e->out_secret = 0;
  e->out.len = 0;
  /* a huge body chunk should not pin its memory for the whole session */
  if (e->out.cap > (1u << 20)) buf_free(&e->out, 0);
  return 1;
}

static int eng_pending(lua_State *L) {
  engine_t *e = check_engine(L);
  lua_pushinteger(L, (lua_Integer)e->qlen);
  lua_pushinteger(L, (lua_Integer)(e->in.len - e->rpos));
  return 2;
}

static int eng_state(lua_State *L) {
  engine_t *e = check_engine(L);
  lua_pushstring(L, state_names[e->state]);
  return 1;
}

/* After STARTTLS everything learned in the clear is forgotten (RFC 3207 4.2). */
static int eng_reset(lua_State *L) {
  engine_t *e = check_engine(L);
  if (e->in.p) OPENSSL_cleanse(e->in.p, e->in.len);
  e->in.len = e->rpos = 0;
  e->caps = 0;
  e->tx_utf8 = 0;
  e->qhead = e->qlen = 0;
  e->bol = 1;
  e->after_cr = 0;
  sasl_clear(e);
  set_state(L, e, ST_IDLE);
  trace_f(L, e, "info", "forgot everything learned before TLS");
  return 0;
}

static int eng_trace_events(lua_State *L) {
  engine_t *e = check_engine(L);
  if (e->trace_ref == LUA_NOREF) return 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, e->trace_ref);
  if (om_rawlen(L, -1) == 0) return 0;
  luaL_unref(L, LUA_REGISTRYINDEX, e->trace_ref);
  lua_newtable(L);
  e->trace_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

static int eng_trace_info(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  trace_add(L, e, "info", s, n);
  return 0;
}

/* ---- Lua methods: commands -------------------------------------------- */

static int eng_expect_greeting(lua_State *L) {
  engine_t *e = check_engine(L);
  queue_push(L, e, ST_GREETING);
  return 0;
}

static int cmd_domain(lua_State *L, const char *verb, smtp_state s) {
  engine_t *e = check_engine(L);
  size_t n;
  const char *d = luaL_checklstring(L, 2, &n);
  const char *why = param_problem(d, n);
  if (why || n > 255) return om_fail(L, "config", "invalid", "%s name %s", verb, why ? why : "is too long");
  emit_cmd(L, e, verb, d, n, s);
  lua_pushboolean(L, 1);
  return 1;
}

static int eng_ehlo(lua_State *L) { return cmd_domain(L, "EHLO", ST_EHLO); }
static int eng_helo(lua_State *L) { return cmd_domain(L, "HELO", ST_HELO); }

static int cmd_simple(lua_State *L, const char *verb, smtp_state s) {
  engine_t *e = check_engine(L);
  emit_cmd(L, e, verb, NULL, 0, s);
  return 0;
}

static int eng_starttls(lua_State *L) { return cmd_simple(L, "STARTTLS", ST_STARTTLS); }
static int eng_data(lua_State *L) { return cmd_simple(L, "DATA", ST_DATA); }
static int eng_noop(lua_State *L) { return cmd_simple(L, "NOOP", ST_NOOP); }
static int eng_quit(lua_State *L) { return cmd_simple(L, "QUIT", ST_QUIT); }
/* A new transaction starts a new message: nothing of the body filter's line
 * state may carry over from one that was abandoned half-way. */
static void body_reset(engine_t *e) {
  e->bol = 1;
  e->after_cr = 0;
  e->body_bytes = 0;
  e->tmp.len = 0;
}

static int eng_rset(lua_State *L) {
  engine_t *e = check_engine(L);
  e->tx_utf8 = 0;
  body_reset(e);
  return cmd_simple(L, "RSET", ST_RSET);
}

/* MAIL FROM:<a> / RCPT TO:<a> with ESMTP parameters given as a list of strings. */
static int cmd_path(lua_State *L, const char *verb, int is_mail, smtp_state s) {
  engine_t *e = check_engine(L);
  size_t n, i, np = 0;
  const char *a = luaL_checklstring(L, 2, &n);
  const char *why;
  int utf8;
  luaL_Buffer b;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    np = om_rawlen(L, 3);
  }
  if (is_mail) {
    utf8 = 0;
    for (i = 1; i <= np; i++) {
      size_t pl;
      const char *p;
      lua_rawgeti(L, 3, (int)i);
      p = lua_tolstring(L, -1, &pl);
      if (p && caps_keyword(p, pl, "SMTPUTF8")) utf8 = 1;
      lua_pop(L, 1);
    }
    utf8 = utf8 && (e->caps & CAP_SMTPUTF8);
  } else {
    utf8 = e->tx_utf8;
  }
  why = address_problem(&a, &n, is_mail, utf8);
  if (why) return om_fail(L, "config", "invalid_address", "%s address %s", is_mail ? "sender" : "recipient", why);
  for (i = 1; i <= np; i++) {
    size_t pl;
    const char *p;
    lua_rawgeti(L, 3, (int)i);
    p = lua_tolstring(L, -1, &pl);
    if (!p) return luaL_error(L, "parameter %d: expected a string", (int)i);
    why = param_problem(p, pl);
    lua_pop(L, 1);
    if (why) return om_fail(L, "config", "invalid_parameter", "%s parameter %s", verb, why);
  }
  luaL_buffinit(L, &b);
  luaL_addstring(&b, verb);
  luaL_addchar(&b, '<');
  luaL_addlstring(&b, a, n);
  luaL_addchar(&b, '>');
  for (i = 1; i <= np; i++) {
    luaL_addchar(&b, ' ');
    lua_rawgeti(L, 3, (int)i);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
  {
    size_t cl;
    const char *c = lua_tolstring(L, -1, &cl);
    emit_line(L, e, c, cl, NULL);
  }
  queue_push(L, e, s);
  if (is_mail) {
    e->tx_utf8 = utf8;
    body_reset(e);
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int eng_mail(lua_State *L) { return cmd_path(L, "MAIL FROM:", 1, ST_MAIL); }
static int eng_rcpt(lua_State *L) { return cmd_path(L, "RCPT TO:", 0, ST_RCPT); }

/* core.smtp.check_address(addr, utf8_ok) -> true | nil, err: the same checks
 * MAIL/RCPT make, so a whole message can be refused before anything is sent. */
static int smtp_check_address(lua_State *L) {
  size_t n;
  const char *a = luaL_checklstring(L, 1, &n);
  const char *why = address_problem(&a, &n, 0, lua_toboolean(L, 2));
  if (why) return om_fail(L, "config", "invalid_address", "address %s", why);
  lua_pushboolean(L, 1);
  return 1;
}

/* Pushes option k of table t and returns it checked, or NULL when absent and
 * not required. The value stays on the stack so the pointer stays valid; it
 * raises only before eng_auth has allocated anything. */
static const char *cred_opt(lua_State *L, int t, const char *k, int required, size_t *len) {
  size_t n, i;
  const char *s;
  om_getfield(L, t, k);
  if (lua_isnil(L, -1)) {
    if (required) luaL_error(L, "auth: option '%s' is required", k);
    *len = 0;
    return NULL;
  }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "auth: option '%s': expected a string", k);
  s = lua_tolstring(L, -1, &n);
  if (n > MAX_CRED_LEN) luaL_error(L, "auth: option '%s' is longer than %d bytes", k, MAX_CRED_LEN);
  for (i = 0; i < n; i++)
    if (s[i] == 0 || s[i] == 1 || s[i] == '\r' || s[i] == '\n')
      luaL_error(L, "auth: option '%s' contains a NUL, ^A, CR or LF", k);
  *len = n;
  return s;
}

static char *put(char *d, const char *s, size_t n) {
  memcpy(d, s, n);
  return d + n;
}

static void wipe_free(char *p, size_t n) {
  if (p) OPENSSL_cleanse(p, n);
  free(p);
}

/* eng:auth(mech, {user=, token= | password=, host=, port=, initial=true|false})
 * Builds the SASL response, sends it as an initial response when initial is
 * true, else waits for the server's 334. Returns the line length an initial
 * response would have had, so Lua can see why it chose.
 * Every option is read and checked first, the response is built in one block
 * of its exact size, and nothing raises while a secret is held outside the
 * engine (whose buffers close/__gc wipe). */
static int eng_auth(lua_State *L) {
  engine_t *e = check_engine(L);
  const char *m = luaL_checkstring(L, 2);
  int mech, initial;
  lua_Number max_initial, port;
  size_t line_len, ulen, hlen = 0, slen, rawlen = 0, plen = 0, i;
  const char *user, *host = NULL, *secret;
  char *raw = NULL, *ucopy, *scopy, *d;
  char pbuf[40];
  char traced[700];
  luaL_checktype(L, 3, LUA_TTABLE);
  if (e->qlen > 0) return luaL_error(L, "smtp engine: AUTH must not be pipelined");
  if (caps_keyword(m, strlen(m), "XOAUTH2")) mech = MECH_XOAUTH2;
  else if (caps_keyword(m, strlen(m), "OAUTHBEARER")) mech = MECH_OAUTHBEARER;
  else if (caps_keyword(m, strlen(m), "PLAIN")) mech = MECH_PLAIN;
  else if (caps_keyword(m, strlen(m), "LOGIN")) mech = MECH_LOGIN;
  else return luaL_argerror(L, 2, "unknown SASL mechanism");
  /* initial: true, false, or nil = only when the AUTH line fits max_initial */
  initial = om_opt_bool(L, 3, "initial", -1);
  max_initial = om_opt_number(L, 3, "max_initial", 1000);
  port = om_opt_number(L, 3, "port", 0);
  user = cred_opt(L, 3, "user", 1, &ulen);
  if (mech == MECH_OAUTHBEARER) host = cred_opt(L, 3, "host", 0, &hlen);
  secret = cred_opt(L, 3, (mech == MECH_PLAIN || mech == MECH_LOGIN) ? "password" : "token", 1, &slen);
  if (port > 0) plen = (size_t)snprintf(pbuf, sizeof pbuf, "port=%.0f\001", (double)port);
  if (plen >= sizeof pbuf) return luaL_error(L, "auth: option 'port' is out of range");
  /* the exact size of the raw response */
  if (mech == MECH_XOAUTH2) {
    rawlen = 5 + ulen + 13 + slen + 2;
  } else if (mech == MECH_OAUTHBEARER) {
    rawlen = 4 + ulen + 2 + (host ? 5 + hlen + 1 : 0) + plen + 12 + slen + 2;
    for (i = 0; i < ulen; i++) if (user[i] == ',' || user[i] == '=') rawlen += 2;
  } else if (mech == MECH_PLAIN) {
    rawlen = 1 + ulen + 1 + slen;
  }
  /* from here on nothing raises until every block is the engine's */
  ucopy = malloc(ulen + 1);
  scopy = malloc(slen + 1);
  if (rawlen) raw = malloc(rawlen);
  if (!ucopy || !scopy || (rawlen && !raw)) {
    free(ucopy);
    wipe_free(scopy, 0);
    wipe_free(raw, 0);
    return luaL_error(L, "smtp engine: out of memory");
  }
  memcpy(ucopy, user, ulen + 1);
  memcpy(scopy, secret, slen + 1);
  d = raw;
  if (mech == MECH_XOAUTH2) {
    d = put(d, "user=", 5);
    d = put(d, user, ulen);
    d = put(d, "\001auth=Bearer ", 13);
    d = put(d, secret, slen);
    d = put(d, "\001\001", 2);
  } else if (mech == MECH_OAUTHBEARER) {
    /* GS2 header (RFC 5801): ',' and '=' in the authzid are escaped */
    d = put(d, "n,a=", 4);
    for (i = 0; i < ulen; i++) {
      if (user[i] == ',') d = put(d, "=2C", 3);
      else if (user[i] == '=') d = put(d, "=3D", 3);
      else *d++ = user[i];
    }
    d = put(d, ",\001", 2);
    if (host) {
      d = put(d, "host=", 5);
      d = put(d, host, hlen);
      d = put(d, "\001", 1);
    }
    d = put(d, pbuf, plen);
    d = put(d, "auth=Bearer ", 12);
    d = put(d, secret, slen);
    d = put(d, "\001\001", 2);
  } else if (mech == MECH_PLAIN) {
    d = put(d, "", 1);
    d = put(d, user, ulen);
    d = put(d, "", 1);
    d = put(d, secret, slen);
  }
  (void)d;
  sasl_clear(e);
  e->mech = mech;
  e->user = ucopy;
  e->secret2 = scopy;
  e->secret2_len = slen;
  e->blob = raw;
  e->blob_len = rawlen;
  lua_settop(L, 3);
  line_len = 5 + strlen(mech_names[mech]) + 1 + 4 * ((e->blob_len + 2) / 3) + 2;
  if (initial < 0) initial = (lua_Number)line_len <= max_initial;
  if (mech == MECH_LOGIN) initial = 0;
  if (!initial && mech != MECH_LOGIN)
    trace_f(L, e, "info", "two-step AUTH (an initial response would make a %lu-byte line)",
            (unsigned long)line_len);
  lua_pushboolean(L, initial);
  lua_pushinteger(L, (lua_Integer)line_len);
  if (initial) {
    buf_reserve(L, &e->out, line_len + 2);
    e->out_secret = 1;
    buf_adds(L, &e->out, "AUTH ");
    buf_adds(L, &e->out, mech_names[mech]);
    buf_adds(L, &e->out, " ");
    buf_add_b64(L, &e->out, e->blob, e->blob_len);
    buf_adds(L, &e->out, "\r\n");
    snprintf(traced, sizeof traced, "AUTH %s ", mech_names[mech]);
    trace_sasl(L, e, traced + strlen(traced), sizeof traced - strlen(traced), "<");
    strncat(traced, ">", sizeof traced - strlen(traced) - 1);
    trace_f(L, e, "send", "%s", traced);
    queue_push(L, e, ST_AUTH);
    queue_head(L, e, ST_AUTH_RESP);
    secret_free(&e->blob, &e->blob_len);
  } else {
    snprintf(traced, sizeof traced, "AUTH %s", mech_names[mech]);
    emit_line(L, e, traced, strlen(traced), NULL);
    queue_push(L, e, ST_AUTH);
  }
  return 2;
}

/* ---- message data ----------------------------------------------------- */

/* CRLF normalisation (bare CR and bare LF become CRLF) and, for DATA, dot
 * stuffing; the line state is carried across chunks so a split "\r|\n" or a
 * '.' right after a chunk boundary come out the same as in one piece. */
static void filter(lua_State *L, engine_t *e, buf_t *o, const char *s, size_t n, int stuff) {
  size_t i = 0;
  buf_reserve(L, o, n + n / 8 + 16);
  while (i < n) {
    size_t j = i;
    /* copy the plain run up to the next CR/LF in one go */
    if (!(e->bol && stuff && s[i] == '.') && !e->after_cr) {
      while (j < n && s[j] != '\r' && s[j] != '\n') j++;
      if (j > i) {
        buf_reserve(L, o, j - i + 3);
        memcpy(o->p + o->len, s + i, j - i);
        o->len += j - i;
        e->bol = 0;
        i = j;
        continue;
      }
    }
    buf_reserve(L, o, 3);
    if (e->after_cr) {
      /* the LF of a CRLF split across chunks: CRLF is already out */
      e->after_cr = 0;
      if (s[i] == '\n') i++;
      continue;
    }
    if (s[i] == '\r' || s[i] == '\n') {
      o->p[o->len++] = '\r';
      o->p[o->len++] = '\n';
      e->after_cr = s[i] == '\r';
      e->bol = 1;
    } else {
      /* a '.' opening a line: stuff it (RFC 5321 4.5.2) */
      o->p[o->len++] = '.';
      o->p[o->len++] = '.';
      e->bol = 0;
    }
    i++;
  }
}

static int eng_body(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  filter(L, e, &e->out, s, n, 1);
  e->body_bytes += n;
  return 0;
}

static void end_of_message(lua_State *L, engine_t *e, buf_t *o) {
  if (!e->bol) buf_adds(L, o, "\r\n");
  trace_f(L, e, "send", "<%lu bytes of message data>", (unsigned long)e->body_bytes);
  e->bol = 1;
  e->after_cr = 0;
  e->body_bytes = 0;
}

static int eng_body_end(lua_State *L) {
  engine_t *e = check_engine(L);
  end_of_message(L, e, &e->out);
  buf_adds(L, &e->out, ".\r\n");
  trace_add(L, e, "send", ".", 1);
  queue_push(L, e, ST_DATA_END);
  return 0;
}

/* eng:bdat(chunk, last): RFC 3030 framing of the normalised chunk. */
static int eng_bdat(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t n;
  const char *s = luaL_optlstring(L, 2, "", &n);
  int last = lua_toboolean(L, 3);
  char head[64];
  int hl;
  e->tmp.len = 0;
  filter(L, e, &e->tmp, s, n, 0);
  e->body_bytes += n;
  if (last) {
    size_t total = e->body_bytes;
    if (!e->bol) buf_adds(L, &e->tmp, "\r\n");
    e->bol = 1;
    e->after_cr = 0;
    e->body_bytes = total;
  }
  hl = snprintf(head, sizeof head, "BDAT %lu%s", (unsigned long)e->tmp.len, last ? " LAST" : "");
  emit_line(L, e, head, (size_t)hl, NULL);
  buf_add(L, &e->out, e->tmp.p ? e->tmp.p : "", e->tmp.len);
  if (last) {
    trace_f(L, e, "send", "<%lu bytes of message data>", (unsigned long)e->body_bytes);
    e->body_bytes = 0;
  }
  queue_push(L, e, ST_BDAT);
  if (e->tmp.cap > (1u << 20)) buf_free(&e->tmp, 0);
  return 0;
}

/* ---- lifecycle -------------------------------------------------------- */

static int eng_close(lua_State *L) {
  engine_t *e = (engine_t *)luaL_checkudata(L, 1, SMTP_ENGINE);
  if (e->closed) return 0;
  e->closed = 1;
  sasl_clear(e);
  buf_free(&e->in, 1);
  buf_free(&e->out, 1);
  buf_free(&e->tmp, 0);
  buf_free(&e->red, 1);
  free(e->queue);
  e->queue = NULL;
  if (e->trace_ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, e->trace_ref);
  e->trace_ref = LUA_NOREF;
  return 0;
}

static int eng_tostring(lua_State *L) {
  engine_t *e = (engine_t *)luaL_checkudata(L, 1, SMTP_ENGINE);
  if (e->closed) lua_pushliteral(L, "smtp engine (closed)");
  else lua_pushfstring(L, "smtp engine (%s, %d awaiting)", state_names[e->state], (int)e->qlen);
  return 1;
}

/* core.smtp.engine{trace=bool, max_line=4096, max_reply=65536} */
static int smtp_engine_new(lua_State *L) {
  engine_t *e;
  int trace = 0;
  lua_Number max_line = 4096, max_reply = 65536;
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    trace = om_opt_bool(L, 1, "trace", 0);
    max_line = om_opt_number(L, 1, "max_line", max_line);
    max_reply = om_opt_number(L, 1, "max_reply", max_reply);
  }
  if (max_line < 16 || max_reply < max_line) return luaL_error(L, "engine: max_line >= 16 and max_reply >= max_line");
  e = (engine_t *)lua_newuserdata(L, sizeof *e);
  memset(e, 0, sizeof *e);
  e->closed = 1;  /* until fully built, __gc has nothing to free */
  e->trace_ref = LUA_NOREF;
  luaL_getmetatable(L, SMTP_ENGINE);
  lua_setmetatable(L, -2);
  e->max_line = (size_t)max_line;
  e->max_reply = (size_t)max_reply;
  e->bol = 1;
  e->state = ST_IDLE;
  if (trace) {
    lua_newtable(L);
    e->trace_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  e->closed = 0;
  return 1;
}

static const luaL_Reg methods[] = {
  { "feed", eng_feed },
  { "reply", eng_reply },
  { "output", eng_output },
  { "pending", eng_pending },
  { "state", eng_state },
  { "reset", eng_reset },
  { "trace_events", eng_trace_events },
  { "trace_info", eng_trace_info },
  { "expect_greeting", eng_expect_greeting },
  { "ehlo", eng_ehlo },
  { "helo", eng_helo },
  { "starttls", eng_starttls },
  { "auth", eng_auth },
  { "mail", eng_mail },
  { "rcpt", eng_rcpt },
  { "data", eng_data },
  { "body", eng_body },
  { "body_end", eng_body_end },
  { "bdat", eng_bdat },
  { "rset", eng_rset },
  { "noop", eng_noop },
  { "quit", eng_quit },
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
  { "engine", smtp_engine_new },
  { "check_address", smtp_check_address },
  { NULL, NULL }
};

void om_smtp_open(lua_State *L) {
  int i;
  if (luaL_newmetatable(L, SMTP_ENGINE)) {
    om_setfuncs(L, metamethods);
    om_newlib(L, methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  om_setfuncs(L, functions);
  lua_newtable(L);
  for (i = 0; state_names[i]; i++) {
    lua_pushstring(L, state_names[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "states");
}
