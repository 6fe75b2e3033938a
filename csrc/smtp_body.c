/* smtp_body.c — the SMTP engine's message data: CRLF normalisation and dot
 * stuffing for DATA, RFC 3030 framing for BDAT, with the line state carried
 * across chunks so a body cut anywhere comes out as if sent in one piece. */
#include <stdio.h>
#include <string.h>
#include "smtp_engine.h"

/* A new transaction starts a new message: nothing of the body filter's line
 * state may carry over from one that was abandoned half-way. */
void body_reset(engine_t *e) {
  e->bol = 1;
  e->after_cr = 0;
  e->body_bytes = 0;
  e->tmp.len = 0;
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

int eng_body(lua_State *L) {
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

int eng_body_end(lua_State *L) {
  engine_t *e = check_engine(L);
  end_of_message(L, e, &e->out);
  buf_adds(L, &e->out, ".\r\n");
  trace_add(L, e, "send", ".", 1);
  queue_push(L, e, ST_DATA_END);
  return 0;
}

/* Is s already what the filter would make of it (every CR and LF in a CRLF
 * pair, ending in one) with nothing carried from an earlier chunk? Then it
 * goes out as it is. memchr finds the line ends at vector speed. */
static int clean_lines(const engine_t *e, const char *s, size_t n) {
  const char *p = s, *end = s + n;
  if (!e->bol || e->after_cr || n < 2 || s[n - 2] != '\r' || s[n - 1] != '\n') return 0;
  while (p < end) {
    const char *lf = memchr(p, '\n', (size_t)(end - p));
    const char *cr = memchr(p, '\r', (size_t)((lf ? lf : end) - p));
    if (!lf || lf == p || lf[-1] != '\r' || (cr && cr != lf - 1)) return 0;
    p = lf + 1;
  }
  return 1;
}

/* The chunk filtered into e->tmp goes out framed: "BDAT n[ LAST]" and it. */
static void bdat_framed(lua_State *L, engine_t *e, int last) {
  char head[64];
  int hl;
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
}

/* A whole message already clean goes out as it is: one copy, no filter. */
static void bdat_clean_head(lua_State *L, engine_t *e, size_t n) {
  char head[64];
  int hl = snprintf(head, sizeof head, "BDAT %lu LAST", (unsigned long)n);
  emit_line(L, e, head, (size_t)hl, NULL);
}

static void bdat_clean_tail(lua_State *L, engine_t *e, size_t n) {
  trace_f(L, e, "send", "<%lu bytes of message data>", (unsigned long)(e->body_bytes + n));
  e->body_bytes = 0;
  queue_push(L, e, ST_BDAT);
}

/* RFC 3030 framing of the normalised chunk: "BDAT n[ LAST]" and the data. */
void bdat_emit(lua_State *L, engine_t *e, const char *s, size_t n, int last) {
  if (last && clean_lines(e, s, n)) {
    bdat_clean_head(L, e, n);
    buf_add(L, &e->out, s, n);
    bdat_clean_tail(L, e, n);
    return;
  }
  e->tmp.len = 0;
  filter(L, e, &e->tmp, s, n, 0);
  e->body_bytes += n;
  bdat_framed(L, e, last);
}

/* A whole message given as the list of strings at index t (n of them),
 * which make it one after the other: BDAT LAST of all of them. */
void bdat_emit_parts(lua_State *L, engine_t *e, int t, size_t n) {
  size_t i, total = 0;
  int clean = 1;
  for (i = 1; i <= n; i++) {
    size_t l;
    const char *s;
    lua_rawgeti(L, t, (int)i);
    s = lua_tolstring(L, -1, &l);
    /* each part clean on its own (and ending a line) keeps the whole clean */
    if (l && !clean_lines(e, s, l)) clean = 0;
    total += l;
    lua_pop(L, 1);  /* the list holds the string */
  }
  if (clean && total) {
    bdat_clean_head(L, e, total);
    for (i = 1; i <= n; i++) {
      size_t l;
      const char *s;
      lua_rawgeti(L, t, (int)i);
      s = lua_tolstring(L, -1, &l);
      buf_add(L, &e->out, s, l);
      lua_pop(L, 1);
    }
    bdat_clean_tail(L, e, total);
    return;
  }
  e->tmp.len = 0;
  for (i = 1; i <= n; i++) {
    size_t l;
    const char *s;
    lua_rawgeti(L, t, (int)i);
    s = lua_tolstring(L, -1, &l);
    filter(L, e, &e->tmp, s, l, 0);
    e->body_bytes += l;
    lua_pop(L, 1);
  }
  bdat_framed(L, e, 1);
}

/* eng:bdat(chunk, last) */
int eng_bdat(lua_State *L) {
  engine_t *e = check_engine(L);
  size_t n;
  const char *s = luaL_optlstring(L, 2, "", &n);
  bdat_emit(L, e, s, n, lua_toboolean(L, 3));
  return 0;
}
