/* smtp.c — the SMTP client engine (RFC 5321 with EHLO extensions, STARTTLS,
 * SASL XOAUTH2/OAUTHBEARER/PLAIN/LOGIN, PIPELINING, CHUNKING): the engine
 * object and the commands it sends.
 *
 * The engine never touches a socket: Lua feeds it the bytes it received
 * (eng:feed) and takes the bytes to write (eng:output). Commands are queued
 * with the state whose reply they wait for; each complete reply is parsed
 * (smtp_reply.c), handed to the handler of the state at the head of the
 * queue (SASL's in smtp_sasl.c), and returned to Lua as a table. Message data
 * goes through the filter in smtp_body.c. Which command comes next is Lua's
 * business (lua/oauthmail/smtp.lua). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include "smtp_engine.h"
#include "conn.h"

#define X_NAME(n) #n,
const char *const state_names[] = { SMTP_STATES(X_NAME) NULL };

/* ---- buffers ---------------------------------------------------------- */

/* Grows by copy, never realloc: the old block may hold a SASL response or a
 * server's echo of one, and realloc would free it unwiped. */
void buf_reserve(lua_State *L, buf_t *b, size_t extra) {
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

void buf_add(lua_State *L, buf_t *b, const void *s, size_t n) {
  if (n == 0) return;  /* b->p may be NULL: no arithmetic on it */
  buf_reserve(L, b, n);
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

void buf_adds(lua_State *L, buf_t *b, const char *s) { buf_add(L, b, s, strlen(s)); }

void buf_free(buf_t *b, int wipe) {
  if (b->p && wipe) OPENSSL_cleanse(b->p, b->cap);
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

void secret_free(char **p, size_t *n) {
  if (*p) {
    OPENSSL_cleanse(*p, *n);
    free(*p);
  }
  *p = NULL;
  *n = 0;
}

void sasl_clear(engine_t *e) {
  size_t ulen = e->user ? strlen(e->user) : 0;
  secret_free(&e->blob, &e->blob_len);
  secret_free(&e->secret2, &e->secret2_len);
  secret_free(&e->user, &ulen);
  e->mech = MECH_NONE;
}

/* ---- trace ------------------------------------------------------------ */

void trace_add(lua_State *L, engine_t *e, const char *dir, const char *text, size_t n) {
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

void trace_f(lua_State *L, engine_t *e, const char *dir, const char *fmt, ...) {
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
void set_state(lua_State *L, engine_t *e, smtp_state s) {
  if (e->state != s)
    trace_f(L, e, "info", "state %s -> %s", state_names[e->state], state_names[s]);
  e->state = s;
}

/* ---- the queue of awaited replies ------------------------------------- */

void queue_push(lua_State *L, engine_t *e, smtp_state s) {
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

void queue_pop(lua_State *L, engine_t *e) {
  if (e->qlen > 0) {
    e->qhead++;
    e->qlen--;
  }
  if (e->qlen == 0) e->qhead = 0;
  set_state(L, e, e->qlen ? (smtp_state)e->queue[e->qhead] : ST_IDLE);
}

/* Replace the head's state: a SASL exchange moves on while staying in place. */
void queue_head(lua_State *L, engine_t *e, smtp_state s) {
  if (e->qlen) e->queue[e->qhead] = (unsigned char)s;
  set_state(L, e, s);
}

/* ---- validation ------------------------------------------------------- */

engine_t *check_engine(lua_State *L) {
  engine_t *e = (engine_t *)luaL_checkudata(L, 1, SMTP_ENGINE);
  if (e->closed) luaL_error(L, "attempt to use a closed smtp engine");
  return e;
}

int has_8bit(const char *s, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) if ((unsigned char)s[i] >= 0x80) return 1;
  return 0;
}

/* Checks a path; strips one balanced pair of <> around it. Returns NULL when
 * fine, else the reason, for the caller's config error. */
const char *address_problem(const char **s, size_t *n, int allow_empty, int utf8) {
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

/* ---- output ----------------------------------------------------------- */

void emit_line(lua_State *L, engine_t *e, const char *line, size_t n, const char *traced) {
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

/* An ESMTP keyword, case-insensitively: EHLO lines, MAIL parameters and
 * SASL mechanism names all compare this way. */
int caps_keyword(const char *k, size_t n, const char *name) {
  size_t i, m = strlen(name);
  if (n != m) return 0;
  for (i = 0; i < n; i++) {
    char c = k[i];
    if (c >= 'a' && c <= 'z') c = (char)(c - 32);
    if (c != name[i]) return 0;
  }
  return 1;
}

/* ---- Lua methods: bytes in and out ------------------------------------ */

static void feed_bytes(lua_State *L, engine_t *e, const char *s, size_t n) {
  /* keep the unparsed tail only, so the buffer never grows without bound */
  if (e->rpos > 0 && e->rpos > e->in.len / 2) {
    memmove(e->in.p, e->in.p + e->rpos, e->in.len - e->rpos);
    e->in.len -= e->rpos;
    e->rpos = 0;
  }
  buf_add(L, &e->in, s, n);
}

static int eng_feed(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t n;
  const char *s = luaL_checklstring(L, 2, &n);
  feed_bytes(L, e, s, n);
  return 0;
}

/* eng:read_from(conn, deadline) -> true | "r"|"w", fd, deadline | nil, err
 * What a connection of oauthmail.conn has received, or what one read of it
 * brings, moved straight into the engine as eng:feed would take it, with
 * no Lua string made. A step: call again when the descriptor is ready. */
static int eng_read_from(lua_State *L) {
  engine_t *e = check_engine(L);
  conn_t *c = om_conn_check_open(L, 2);
  lua_Number d = luaL_checknumber(L, 3);
  luaL_argcheck(L, d == d, 3, "deadline must be a number");
  if (c->rlen == c->rpos) {
    int rc = om_io_fill(L, c, 0, (double)d);
    if (rc == STEP_FAILED) return 2;
    if (rc != STEP_DONE) return om_push_want(L, rc, c->fd, (double)d);
  }
  feed_bytes(L, e, c->rbuf + c->rpos, c->rlen - c->rpos);
  c->rpos = c->rlen;
  c->scanned = 0;
  lua_pushboolean(L, 1);
  return 1;
}

/* The output was handed over whole: wipe what held a credential, and let
 * a huge body chunk not pin its memory for the whole session. */
static void out_done(engine_t *e) {
  if (e->out_secret && e->out.p) OPENSSL_cleanse(e->out.p, e->out.len);
  e->out_secret = 0;
  e->out.len = e->out_off = 0;
  if (e->out.cap > (1u << 20)) buf_free(&e->out, 0);
}

static int eng_output(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t off = e->out_off < e->out.len ? e->out_off : e->out.len;
  lua_pushlstring(L, e->out.p ? e->out.p + off : "", e->out.len - off);
  out_done(e);
  return 1;
}

/* eng:write_to(conn, deadline) -> true | "r"|"w", fd, deadline | nil, err
 * The output written straight to a connection of oauthmail.conn (core.conn),
 * as much as it takes now: no Lua string of it is made. A step like the
 * connection's own write; call again when the descriptor is ready. */
static int eng_write_to(lua_State *L) {
  engine_t *e = check_engine(L);
  conn_t *c = om_conn_check_open(L, 2);
  lua_Number d = luaL_checknumber(L, 3);
  int rc;
  luaL_argcheck(L, d == d, 3, "deadline must be a number");
  if (e->out_off < e->out.len) {
    rc = om_io_write(L, c, e->out.p, e->out.len, &e->out_off, (double)d);
    if (rc == STEP_FAILED) return 2;
    if (rc != STEP_DONE) return om_push_want(L, rc, c->fd, (double)d);
  }
  out_done(e);
  lua_pushboolean(L, 1);
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
  e->wlen = e->wpos = e->wcmds = 0;
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
  batch_free(e);
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
  { "write_to", eng_write_to },
  { "read_from", eng_read_from },
  { "pending", eng_pending },
  { "state", eng_state },
  { "reset", eng_reset },
  { "trace_events", eng_trace_events },
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
  { "batch", eng_batch },
  { "batch_replies", eng_batch_replies },
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
