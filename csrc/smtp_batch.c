/* smtp_batch.c — the SMTP engine's pipelined batch (RFC 2920 with RFC 3030):
 * many messages written as RSET/MAIL/RCPT.../BDAT n LAST each, in one go,
 * and their replies matched back to them in order. session:send_many in
 * lua/oauthmail/smtp.lua drives it; the per-message work that used to be Lua
 * (checks, parameters, commands, one table per reply) is done here, and a
 * reply that says "fine" to RSET, MAIL or RCPT makes no Lua value at all.
 *
 * Every MAIL after the first is preceded by RSET: after a refused RCPT or
 * BDAT the server's transaction state is unknown (RFC 3030 3), and a MAIL
 * that met an open transaction would be refused as nested while its RCPTs
 * and data joined that transaction. With RSET each message's replies tell
 * its own fate, so nothing is ever sent twice. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "smtp_engine.h"

struct batch_msg {
  lua_Integer idx;   /* the message's index in the caller's list */
  size_t nrcpt;
  int rset;          /* an RSET goes before its MAIL */
};

enum { STAGE_RSET, STAGE_MAIL, STAGE_RCPT, STAGE_BDAT };

#define MAX_PARAMS_LEN 96  /* " SIZE=<20 digits> BODY=8BITMIME SMTPUTF8" */

void batch_free(engine_t *e) {
  free(e->win);
  free(e->wacc);
  e->win = NULL;
  e->wacc = NULL;
  e->wlen = e->wcap = e->wpos = e->wacc_cap = 0;
}

/* The i-th recipient of a message whose `to` (at that stack index) is one
 * address or a list of them; the string stays alive in the message. */
static const char *recipient_at(lua_State *L, int to, size_t i, size_t *len) {
  const char *a;
  if (lua_type(L, to) == LUA_TSTRING) return lua_tolstring(L, to, len);
  lua_rawgeti(L, to, (int)i);
  a = lua_tolstring(L, -1, len);
  lua_pop(L, 1);
  return a;
}

/* ---- writing the batch ------------------------------------------------ */

/* The shape of one message, as session:send checks it: a message whose
 * shape is wrong is the caller's bug, reported before anything is queued. */
static const char *shape_problem(lua_State *L, int msg, const char *field) {
  int t;
  if (lua_type(L, msg) != LUA_TTABLE) return "session:send: expected a table";
  lua_getfield(L, msg, "from");
  t = lua_type(L, -1);
  lua_pop(L, 1);
  if (t != LUA_TSTRING) return "session:send: 'from' must be a string";
  lua_getfield(L, msg, "to");
  if (lua_type(L, -1) == LUA_TTABLE) {
    size_t i, n = om_rawlen(L, -1);
    if (n == 0) { lua_pop(L, 1); return "session:send: 'to' must be an address or a non-empty list"; }
    for (i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, (int)i);
      t = lua_type(L, -1);
      lua_pop(L, 1);
      if (t != LUA_TSTRING) {
        lua_pop(L, 1);
        lua_pushfstring(L, "session:send: 'to[%d]' must be a string", (int)i);
        return lua_tostring(L, -1);
      }
    }
  } else if (lua_type(L, -1) != LUA_TSTRING) {
    lua_pop(L, 1);
    return "session:send: 'to' must be an address or a non-empty list";
  }
  lua_pop(L, 1);
  lua_getfield(L, msg, "size");
  if (!lua_isnil(L, -1)) {
    lua_Number v = lua_tonumber(L, -1);
    if (lua_type(L, -1) != LUA_TNUMBER || v < 0 || v != (lua_Number)(lua_Integer)v || v > 9e15) {
      lua_pop(L, 1);
      return "session:send: 'size' must be a whole number of octets";
    }
  }
  lua_pop(L, 1);
  lua_getfield(L, msg, "eight_bit");
  t = lua_type(L, -1);
  lua_pop(L, 1);
  if (t != LUA_TNIL && t != LUA_TBOOLEAN) return "session:send: 'eight_bit' must be a boolean";
  lua_getfield(L, msg, field);
  t = lua_type(L, -1);
  if (t == LUA_TTABLE) {
    size_t i, n = om_rawlen(L, -1);
    for (i = 1; i <= n && t == LUA_TTABLE; i++) {
      lua_rawgeti(L, -1, (int)i);
      if (lua_type(L, -1) != LUA_TSTRING) t = LUA_TNIL;
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  if (t != LUA_TSTRING && t != LUA_TTABLE)
    return "session:send_many: a batched message's data must be a string or a list of strings";
  return NULL;
}

/* The envelope's checks, as session:send makes them before sending: the
 * problem as an error on the stack top, or 0 with *utf8 set when an address
 * needs SMTPUTF8. The recipients list (or string) is at `to`. */
static int envelope_problem(lua_State *L, engine_t *e, const char *from, size_t fl, int to, size_t nrcpt,
                            int *utf8) {
  size_t i;
  int ok8 = (e->caps & CAP_SMTPUTF8) != 0;
  const char *why;
  *utf8 = has_8bit(from, fl);
  why = address_problem(&from, &fl, 1, ok8);
  for (i = 1; !why && i <= nrcpt; i++) {
    size_t al;
    const char *a = recipient_at(L, to, i, &al);
    *utf8 = *utf8 || has_8bit(a, al);
    why = address_problem(&a, &al, 0, ok8);
  }
  if (why) {
    om_push_error(L, "config", "invalid_address", "address %s", why);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "retryable");
    return 1;
  }
  return 0;
}

static void win_push(lua_State *L, engine_t *e, lua_Integer idx, size_t nrcpt, int rset) {
  if (e->wlen == e->wcap) {
    size_t ncap = e->wcap ? e->wcap * 2 : 64;
    struct batch_msg *nw = realloc(e->win, ncap * sizeof *nw);
    if (!nw) luaL_error(L, "smtp engine: out of memory");
    e->win = nw;
    e->wcap = ncap;
  }
  e->win[e->wlen].idx = idx;
  e->win[e->wlen].nrcpt = nrcpt;
  e->win[e->wlen].rset = rset;
  e->wlen++;
}

/* MAIL FROM:<a> with its parameters, and the message's RCPTs. */
static void emit_envelope(lua_State *L, engine_t *e, const char *from, size_t fl, int to, size_t nrcpt,
                          const char *params, size_t pl, int utf8) {
  char line[MAX_PATH_LEN + 16 + MAX_PARAMS_LEN];
  size_t i, n;
  if (fl >= 2 && from[0] == '<' && from[fl - 1] == '>') { from++; fl -= 2; }
  n = (size_t)snprintf(line, sizeof line, "MAIL FROM:<%.*s>%.*s", (int)fl, from, (int)pl, params);
  emit_line(L, e, line, n, NULL);
  queue_push(L, e, ST_MAIL);
  e->tx_utf8 = utf8;
  body_reset(e);
  for (i = 1; i <= nrcpt; i++) {
    size_t al;
    const char *a = recipient_at(L, to, i, &al);
    if (al >= 2 && a[0] == '<' && a[al - 1] == '>') { a++; al -= 2; }
    n = (size_t)snprintf(line, sizeof line, "RCPT TO:<%.*s>", (int)al, a);
    emit_line(L, e, line, n, NULL);
    queue_push(L, e, ST_RCPT);
  }
}

/* eng:batch(list, idx, size_limit [, rset_first [, field]]) -> queued, problems | false, usage
 * Queues list[idx[1]], list[idx[2]], ... (each {from=, to=, data=string,
 * size=, eight_bit=}, the data under `field` if given), behind any batch
 * still awaiting replies. size_limit:
 * -1 when the server offers no SIZE, 0 for SIZE without a limit, else the
 * limit. rset_first: an RSET goes before the first MAIL too (a message
 * before it may have failed and left a transaction open). A message refused before anything is
 * sent (an address, its size) is left out: problems[i] = its error. A wrong
 * shape is the caller's bug: nothing is queued, false and the message. */
int eng_batch(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t k, nidx, queued = 0;
  lua_Integer size_limit;
  int rset_first = lua_toboolean(L, 5);
  size_t fl0;
  const char *fieldarg = luaL_optlstring(L, 6, "data", &fl0);
  char field[64];  /* a copy: the argument goes from the stack below */
  luaL_argcheck(L, fl0 < sizeof field, 6, "field name too long");
  memcpy(field, fieldarg, fl0 + 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  size_limit = luaL_checkinteger(L, 4);
  if (e->qlen != e->wcmds) return luaL_error(L, "smtp engine: a batch needs every earlier reply read first");
  nidx = om_rawlen(L, 3);
  lua_settop(L, 4);
  lua_pushnil(L);  /* 5: the problems, made at the first */
  /* first the shapes, so that a bug queues nothing */
  for (k = 1; k <= nidx; k++) {
    const char *why;
    lua_rawgeti(L, 3, (int)k);
    lua_gettable(L, 2);
    why = shape_problem(L, 6, field);
    if (why) {
      lua_pushboolean(L, 0);
      lua_pushstring(L, why);
      return 2;
    }
    lua_pop(L, 1);
  }
  if (e->wpos == e->wlen) {
    e->wlen = e->wpos = 0;
  } else if (e->wpos > e->wlen / 2) {
    /* keep only the records still awaiting replies */
    memmove(e->win, e->win + e->wpos, (e->wlen - e->wpos) * sizeof *e->win);
    e->wlen -= e->wpos;
    e->wpos = 0;
  }
  for (k = 1; k <= nidx; k++) {
    lua_Integer idx, size;
    size_t fl, dl, nrcpt, pl = 0;
    const char *from, *data;
    int eight, utf8, to, data_idx;
    size_t nparts;
    char params[MAX_PARAMS_LEN];
    lua_settop(L, 5);
    lua_rawgeti(L, 3, (int)k);
    idx = lua_tointeger(L, 6);
    lua_gettable(L, 2);                     /* 6: the message */
    lua_getfield(L, 6, "from");
    from = lua_tolstring(L, -1, &fl);
    lua_getfield(L, 6, "to");
    to = lua_gettop(L);
    nrcpt = lua_type(L, to) == LUA_TSTRING ? 1 : om_rawlen(L, to);
    lua_getfield(L, 6, field);
    data_idx = lua_gettop(L);
    if (lua_type(L, data_idx) == LUA_TSTRING) {
      data = lua_tolstring(L, data_idx, &dl);
      size = (lua_Integer)dl;
      nparts = 0;
    } else {
      /* a list of strings, one message */
      size_t i;
      data = NULL;
      nparts = om_rawlen(L, data_idx);
      size = 0;
      for (i = 1; i <= nparts; i++) {
        lua_rawgeti(L, data_idx, (int)i);
        size += (lua_Integer)om_rawlen(L, -1);
        lua_pop(L, 1);
      }
    }
    lua_getfield(L, 6, "eight_bit");
    if (!lua_isnil(L, -1)) eight = lua_toboolean(L, -1);
    else if (data) eight = has_8bit(data, dl);
    else {
      size_t i, l;
      eight = 0;
      for (i = 1; i <= nparts && !eight; i++) {
        const char *p;
        lua_rawgeti(L, data_idx, (int)i);
        p = lua_tolstring(L, -1, &l);
        eight = has_8bit(p, l);
        lua_pop(L, 1);
      }
    }
    if (!envelope_problem(L, e, from, fl, to, nrcpt, &utf8) && size_limit > 0 && size > size_limit) {
      om_push_error(L, "smtp", "too_large", "message is %lld bytes; the server accepts at most %lld",
                    (long long)size, (long long)size_limit);
      lua_pushboolean(L, 0);
      lua_setfield(L, -2, "retryable");
    }
    if (lua_istable(L, -1)) {
      /* refused before anything was sent: problems[idx] = the error */
      if (lua_isnil(L, 5)) {
        lua_newtable(L);
        lua_replace(L, 5);
      }
      lua_rawseti(L, 5, (int)idx);
      continue;
    }
    if (size_limit >= 0) pl += (size_t)snprintf(params + pl, sizeof params - pl, " SIZE=%lld", (long long)size);
    if ((e->caps & CAP_8BITMIME) && eight) pl += (size_t)snprintf(params + pl, sizeof params - pl, " BODY=8BITMIME");
    if (utf8) pl += (size_t)snprintf(params + pl, sizeof params - pl, " SMTPUTF8");
    if (queued > 0 || rset_first) {
      emit_line(L, e, "RSET", 4, NULL);
      queue_push(L, e, ST_RSET);
    }
    emit_envelope(L, e, from, fl, to, nrcpt, params, pl, utf8);
    if (data) bdat_emit(L, e, data, dl, 1);
    else bdat_emit_parts(L, e, data_idx, nparts);
    win_push(L, e, idx, nrcpt, queued > 0 || rset_first);
    e->wcmds += (queued > 0 || rset_first) + 2 + nrcpt;
    if (e->wpos == e->wlen - 1 && queued == 0) {
      /* nothing was in flight: this message's replies come next */
      e->wstage = e->win[e->wpos].rset ? STAGE_RSET : STAGE_MAIL;
      e->wmail = 0;
      e->wrcpt = 0;
    }
    queued++;
  }
  lua_pushinteger(L, (lua_Integer)queued);
  lua_pushvalue(L, 5);
  return 2;
}

/* ---- reading the replies ---------------------------------------------- */

/* Were all of the message's recipients accepted (its RCPT replies are in)? */
static int accepted_all(const engine_t *e, const struct batch_msg *m) {
  size_t i;
  if (e->wrcpt < m->nrcpt) return 0;
  for (i = 0; i < m->nrcpt; i++) if (!e->wacc[i]) return 0;
  return 1;
}

/* The recipients of the message at `to` that were accepted (e->wacc), as a
 * new list. */
static void push_recipients(lua_State *L, engine_t *e, int to, size_t nrcpt) {
  size_t i, n = 0;
  lua_createtable(L, (int)nrcpt, 0);
  for (i = 1; i <= nrcpt; i++) {
    if (!e->wacc[i - 1]) continue;
    if (lua_type(L, to) == LUA_TSTRING) lua_pushvalue(L, to);
    else lua_rawgeti(L, to, (int)i);
    lua_rawseti(L, -2, (int)++n);
  }
}

/* A finished message: results[idx] = the receipt {code, enhanced, text,
 * accepted, rejected} when MAIL, at least one RCPT and the data were
 * accepted; else {mr=, accepted=, rejected=, fr=} for Lua to explain, and
 * idx goes on st.failed. The final reply's table is on the stack top, the
 * rejected map (or nil) below it. */
static int finish(lua_State *L, engine_t *e, const struct batch_msg *m, int list, int results, int st,
                  int code, int compact) {
  size_t i, any = 0;
  int fr = lua_gettop(L), rejected = fr - 1, to;
  for (i = 0; i < m->nrcpt; i++) any += e->wacc[i];
  if (compact && e->wmail < 300 && any == m->nrcpt && code < 300) {
    /* every recipient took it: the reply alone says so */
    lua_pushvalue(L, fr);
    lua_rawseti(L, results, (int)m->idx);
    lua_settop(L, rejected - 1);
    return 1;
  }
  lua_pushinteger(L, m->idx);
  lua_gettable(L, list);
  lua_getfield(L, -1, "to");
  to = lua_gettop(L);
  if (e->wmail < 300 && any && code < 300) {
    lua_pushvalue(L, fr);                 /* the final reply becomes the receipt */
    push_recipients(L, e, to, m->nrcpt);
    lua_setfield(L, -2, "accepted");
    if (lua_isnil(L, rejected)) lua_newtable(L);
    else lua_pushvalue(L, rejected);
    lua_setfield(L, -2, "rejected");
    lua_rawseti(L, results, (int)m->idx);
    lua_settop(L, rejected - 1);
    return 1;
  }
  lua_createtable(L, 0, 4);
  lua_getfield(L, st, "mail_reply");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 1);
    lua_pushinteger(L, e->wmail);
    lua_setfield(L, -2, "code");
  }
  lua_setfield(L, -2, "mr");
  push_recipients(L, e, to, m->nrcpt);
  lua_setfield(L, -2, "accepted");
  if (lua_isnil(L, rejected)) lua_newtable(L);
  else lua_pushvalue(L, rejected);
  lua_setfield(L, -2, "rejected");
  lua_pushvalue(L, fr);
  lua_setfield(L, -2, "fr");
  lua_rawseti(L, results, (int)m->idx);
  lua_getfield(L, st, "failed");
  lua_pushinteger(L, m->idx);
  lua_rawseti(L, -2, (int)om_rawlen(L, -2) + 1);
  lua_settop(L, rejected - 1);
  return 0;
}

/* eng:batch_replies(list, results, st [, n [, compact]]) -> done, progressed, final_next | nil, err
 * Reads the replies at hand and settles each message whose last reply came.
 * compact: a message every recipient of which was accepted gets the final
 * reply alone ({code, enhanced, text}: accepted is its `to`, rejected none).
 * done: the next n messages awaiting replies (all of them without n) are
 * settled; the replies of any behind them are left unread. progressed: replies read now.
 * final_next: the reply awaited next ends a message's data (it may take the
 * server a long time: RFC 5321 4.5.3.2.6). st (the caller's, kept across
 * calls) gets rset_failed (the first refused RSET), closing (a 421 reply),
 * failed (the indices whose results are {mr, accepted, rejected, fr}) and
 * last_ok (whether the last settled message was accepted). */
int eng_batch_replies(lua_State *L) {
  engine_t *e = check_engine(L);
  int progressed = 0, compact;
  size_t upto;
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  luaL_checktype(L, 4, LUA_TTABLE);
  upto = (size_t)luaL_optinteger(L, 5, 0);
  compact = lua_toboolean(L, 6);
  if (upto == 0 || upto > e->wlen - e->wpos) upto = e->wlen - e->wpos;
  upto += e->wpos;   /* settle the messages up to this record */
  lua_settop(L, 4);
  lua_getfield(L, 4, "failed");
  if (lua_isnil(L, -1)) {
    lua_newtable(L);
    lua_setfield(L, 4, "failed");
  }
  lua_pop(L, 1);
  while (e->wpos < upto) {
    const struct batch_msg *m = &e->win[e->wpos];
    static const smtp_state expect[] = { ST_RSET, ST_MAIL, ST_RCPT, ST_BDAT };
    int code, got, table, full, stage = e->wstage;
    size_t nlines, end;
    if (e->qlen == 0 || e->state != expect[stage])
      return luaL_error(L, "smtp engine: the batch's replies are out of step with its commands");
    got = reply_scan(L, e, &code, &nlines, &end);
    if (got == 2) return 2;
    if (got == 0) break;
    /* a reply that says "fine" before the end of a message makes nothing */
    table = code >= 300 || stage == STAGE_BDAT;
    full = code >= 300;
    if (table && !full && compact && e->wmail < 300 && accepted_all(e, m)) table = 2;
    reply_take(L, e, code, nlines, table, full, NULL, NULL);
    reply_consumed(e, end);
    queue_pop(L, e);
    e->wcmds--;
    progressed++;
    if (code == 421) {
      lua_getfield(L, 4, "closing");
      if (lua_isnil(L, -1)) {
        lua_pushvalue(L, -2);
        lua_setfield(L, 4, "closing");
      }
      lua_pop(L, 1);
    }
    switch (stage) {
    case STAGE_RSET:
      if (code >= 300) {
        lua_getfield(L, 4, "rset_failed");
        if (lua_isnil(L, -1)) {
          lua_pushvalue(L, -2);
          lua_setfield(L, 4, "rset_failed");
        }
        lua_pop(L, 2);
      }
      e->wstage = STAGE_MAIL;
      break;
    case STAGE_MAIL:
      e->wmail = code;
      if (code >= 300) lua_setfield(L, 4, "mail_reply");
      if (m->nrcpt > e->wacc_cap) {
        unsigned char *na = realloc(e->wacc, m->nrcpt);
        if (!na) return luaL_error(L, "smtp engine: out of memory");
        e->wacc = na;
        e->wacc_cap = m->nrcpt;
      }
      e->wrcpt = 0;
      e->wstage = m->nrcpt ? STAGE_RCPT : STAGE_BDAT;
      break;
    case STAGE_RCPT:
      e->wacc[e->wrcpt] = code < 300;
      if (code >= 300) {
        /* rejected[address] = the reply */
        lua_getfield(L, 4, "rejected");    /* 6 */
        if (lua_isnil(L, -1)) {
          lua_pop(L, 1);
          lua_newtable(L);
          lua_pushvalue(L, -1);
          lua_setfield(L, 4, "rejected");
        }
        lua_pushinteger(L, m->idx);
        lua_gettable(L, 2);
        lua_getfield(L, -1, "to");
        if (lua_type(L, -1) == LUA_TTABLE) lua_rawgeti(L, -1, (int)e->wrcpt + 1);
        else lua_pushvalue(L, -1);
        lua_pushvalue(L, 5);
        lua_settable(L, 6);
      }
      e->wrcpt++;
      if (e->wrcpt == m->nrcpt) e->wstage = STAGE_BDAT;
      break;
    default: {
      int ok;
      lua_getfield(L, 4, "rejected");
      lua_insert(L, -2);
      ok = finish(L, e, m, 2, 3, 4, code, compact);
      lua_pushboolean(L, ok);
      lua_setfield(L, 4, "last_ok");
      lua_pushnil(L);
      lua_setfield(L, 4, "rejected");
      lua_pushnil(L);
      lua_setfield(L, 4, "mail_reply");
      e->wpos++;
      e->wstage = e->wpos < e->wlen && e->win[e->wpos].rset ? STAGE_RSET : STAGE_MAIL;
      break;
    }
    }
    lua_settop(L, 4);
  }
  lua_pushboolean(L, e->wpos >= upto);
  lua_pushinteger(L, progressed);
  lua_pushboolean(L, e->wpos < upto && e->wstage == STAGE_BDAT);
  if (e->wpos == e->wlen) e->wlen = e->wpos = 0;
  return 3;
}
