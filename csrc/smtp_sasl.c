/* smtp_sasl.c — SASL for the SMTP engine (RFC 4954): XOAUTH2, OAUTHBEARER
 * (RFC 7628), PLAIN and LOGIN, as an initial response or in two steps; the
 * error challenge and its acknowledgement; cancelling where no challenge may
 * come. The response is built in one block of its exact size and every copy
 * of a credential is wiped; server lines during the exchange are redacted of
 * the secret and of anything that looks like base64. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include "b64.h"
#include "smtp_engine.h"

static const char *const mech_names[] = { "", "XOAUTH2", "OAUTHBEARER", "PLAIN", "LOGIN" };

/* During a SASL exchange a server may quote what it got (sendmail's
 * '500 Command unrecognized: "AUTH XOAUTH2 dXNl..."'): copies s into e->red
 * with the secret in use and every base64-looking run of REDACT_RUN or more
 * replaced, for the trace, the reply table and errors alike. */
void redact_line(lua_State *L, engine_t *e, const char *s, size_t n) {
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
const char *h_auth(lua_State *L, engine_t *e, int code, int reply_idx,
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
int eng_auth(lua_State *L) {
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
