/* smtp_engine.h — what the files of the SMTP engine share (smtp.c: the
 * engine object, its buffers, queue, trace and commands; smtp_reply.c:
 * replies; smtp_sasl.c: SASL; smtp_body.c: the message data filter). Private
 * to csrc/smtp*.c: the functions declared here are hidden like every symbol
 * of oauthmail.core but luaopen_oauthmail_core. */
#ifndef OAUTHMAIL_SMTP_ENGINE_H
#define OAUTHMAIL_SMTP_ENGINE_H

#include <stddef.h>
#include "core.h"

#define SMTP_ENGINE "oauthmail.smtp_engine"

/* One list of states; the enum and the names the trace prints come from it.
 * A state names the reply the engine waits for next. */
#define SMTP_STATES(X) \
  X(IDLE) X(GREETING) X(EHLO) X(HELO) X(STARTTLS) \
  X(AUTH) X(AUTH_RESP) X(AUTH_USER) X(AUTH_PASS) X(AUTH_ERRACK) X(AUTH_CANCEL) \
  X(MAIL) X(RCPT) X(DATA) X(DATA_END) X(BDAT) X(RSET) X(NOOP) X(QUIT)

#define X_ENUM(n) ST_##n,
typedef enum { SMTP_STATES(X_ENUM) ST_COUNT } smtp_state;
OM_HIDDEN extern const char *const state_names[];

enum { MECH_NONE, MECH_XOAUTH2, MECH_OAUTHBEARER, MECH_PLAIN, MECH_LOGIN };

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
  size_t out_off;        /* of which eng:write_to has written this many */
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
  /* a pipelined batch in flight (smtp_batch.c): one record per message,
     win[wpos] the one whose replies come next */
  struct batch_msg *win;
  size_t wlen, wcap, wpos;
  size_t wcmds;          /* the batch's commands awaiting replies */
  int wstage;            /* which of win[wpos]'s replies comes next */
  int wmail;             /* the code of its MAIL reply */
  size_t wrcpt;          /* its RCPT replies so far */
  unsigned char *wacc;   /* which of its recipients were accepted */
  size_t wacc_cap;
} engine_t;

/* smtp.c: buffers (grown by copy, wiped), trace, the queue of awaited
 * replies, output lines */
OM_HIDDEN void buf_reserve(lua_State *L, buf_t *b, size_t extra);
OM_HIDDEN void buf_add(lua_State *L, buf_t *b, const void *s, size_t n);
OM_HIDDEN void buf_adds(lua_State *L, buf_t *b, const char *s);
OM_HIDDEN void buf_free(buf_t *b, int wipe);
OM_HIDDEN void secret_free(char **p, size_t *n);
OM_HIDDEN void sasl_clear(engine_t *e);
OM_HIDDEN void trace_add(lua_State *L, engine_t *e, const char *dir, const char *text, size_t n);
OM_HIDDEN void trace_f(lua_State *L, engine_t *e, const char *dir, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
OM_HIDDEN void set_state(lua_State *L, engine_t *e, smtp_state s);
OM_HIDDEN void queue_push(lua_State *L, engine_t *e, smtp_state s);
OM_HIDDEN void queue_pop(lua_State *L, engine_t *e);
OM_HIDDEN void queue_head(lua_State *L, engine_t *e, smtp_state s);
OM_HIDDEN engine_t *check_engine(lua_State *L);
OM_HIDDEN void emit_line(lua_State *L, engine_t *e, const char *line, size_t n, const char *traced);
OM_HIDDEN int caps_keyword(const char *k, size_t n, const char *name);

/* smtp_reply.c */
OM_HIDDEN int eng_reply(lua_State *L);
OM_HIDDEN int reply_scan(lua_State *L, engine_t *e, int *code, size_t *nlines, size_t *end);
OM_HIDDEN void reply_take(lua_State *L, engine_t *e, int code, size_t nlines, int table, int full,
                          const char **raw, size_t *rawlen);
OM_HIDDEN void reply_consumed(engine_t *e, size_t end);

/* smtp_batch.c: many messages pipelined as RSET/MAIL/RCPT/BDAT LAST */
OM_HIDDEN int eng_batch(lua_State *L);
OM_HIDDEN int eng_batch_replies(lua_State *L);
OM_HIDDEN void batch_free(engine_t *e);

/* smtp_sasl.c: AUTH, the handler of every AUTH_* state, and the redaction
 * of server lines during the exchange */
OM_HIDDEN int eng_auth(lua_State *L);
OM_HIDDEN const char *h_auth(lua_State *L, engine_t *e, int code, int reply_idx,
                             const char *raw, size_t rawlen);
OM_HIDDEN void redact_line(lua_State *L, engine_t *e, const char *s, size_t n);

/* smtp_body.c */
OM_HIDDEN void body_reset(engine_t *e);
OM_HIDDEN int eng_body(lua_State *L);
OM_HIDDEN int eng_body_end(lua_State *L);
OM_HIDDEN int eng_bdat(lua_State *L);
OM_HIDDEN void bdat_emit(lua_State *L, engine_t *e, const char *s, size_t n, int last);
OM_HIDDEN void bdat_emit_parts(lua_State *L, engine_t *e, int t, size_t n);
OM_HIDDEN const char *address_problem(const char **s, size_t *n, int allow_empty, int utf8);
OM_HIDDEN int has_8bit(const char *s, size_t n);

static inline int in_auth(const engine_t *e) {
  return e->state >= ST_AUTH && e->state <= ST_AUTH_CANCEL;
}

static inline int is_b64ish(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '+' || c == '/' || c == '=' || c == '-' || c == '_';
}

#endif
