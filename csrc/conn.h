/* conn.h — what the files of the connection family share: the connection
 * object, and the steps each file provides. No step waits: a step that
 * cannot finish says what it waits for (read or write, on which fd, until
 * when) and the Lua side waits through its waiter (lua/oauthmail/wait.lua).
 *
 *   conn_resolve.c  name resolution on a helper thread, signalled on a pipe
 *   conn_tcp.c      connecting to each address in turn, with its share of the deadline
 *   conn_tls.c      TLS contexts, certificate verification, the handshake step
 *   conn_io.c       the read buffer, line/byte takers, read and write steps
 *   conn_listen.c   the loopback listener (accept step)
 *   conn.c          the object, its methods, registration */
#ifndef OAUTHMAIL_CONN_H
#define OAUTHMAIL_CONN_H

#include <netdb.h>
#include <openssl/ssl.h>
#include "core.h"

#define CONN_MT "oauthmail.conn"
#define LISTENER_MT "oauthmail.listener"
#define LINE_DEFAULT 8192
#define LINE_HARD_MAX (16 * 1024 * 1024)
#define RBUF_INITIAL 16384

/* What a step reports when it cannot go on now. */
enum { STEP_DONE = 0, STEP_WANT_READ = 1, STEP_WANT_WRITE = 2, STEP_FAILED = -1 };

typedef struct {
  int code;          /* X509 verification error of the first failing certificate */
  int depth;
  char subject[256];
  char names[256];   /* the leaf's DNS/IP names, for a host name mismatch */
  char not_before[32];
  char not_after[32];
} verify_info;

typedef struct resolve_job resolve_job;

enum conn_state { CS_NEW, CS_RESOLVING, CS_CONNECTING, CS_HANDSHAKE, CS_OPEN, CS_CLOSED };

typedef struct {
  int fd;              /* -1 until connected and once closed */
  int state;
  SSL *ssl;
  SSL_CTX *ctx;        /* owned; used by the handshake */
  double timeout;      /* seconds, as configured: what messages state */
  double deadline;     /* of connect + handshake */
  char *rbuf;          /* received, not yet consumed bytes: rbuf[rpos..rlen) */
  size_t rpos, rlen, rcap;
  size_t scanned;      /* bytes after rpos already searched for a line end */
  char peer[300];      /* "host:port", for messages */
  char host[256], port[16];
  char name[256];      /* name verified in the handshake ("" for none) */
  int server;          /* server side of a handshake */
  verify_info vinfo;
  /* connecting */
  resolve_job *job;
  struct addrinfo *addrs, *cur;
  int n_left, last_err, saw_refused, saw_timeout;
  double slot;         /* deadline of the address being tried */
} conn_t;

/* conn_resolve.c: start resolving; *out is set at once for a literal address.
 * Returns 0 (started or done), or a getaddrinfo error code. */
OM_HIDDEN int om_resolve_start(const char *host, const char *port, resolve_job **job, struct addrinfo **out);
OM_HIDDEN int om_resolve_fd(resolve_job *job);
/* 1 finished (result in *out, rc in *rc, job freed), 0 still running */
OM_HIDDEN int om_resolve_poll(resolve_job *job, struct addrinfo **out, int *rc);
OM_HIDDEN void om_resolve_abandon(resolve_job *job);

/* conn_tcp.c: one connect step; pushes nil, err on failure. */
OM_HIDDEN int om_tcp_step(lua_State *L, conn_t *c, int *fd, double *deadline);

/* conn_tls.c */
OM_HIDDEN void om_tls_init(void);
OM_HIDDEN SSL_CTX *om_tls_make_ctx(lua_State *L, int t, int server);
OM_HIDDEN int om_tls_begin(lua_State *L, conn_t *c, SSL_CTX *ctx, int server, const char *name);
OM_HIDDEN int om_tls_step(lua_State *L, conn_t *c, double deadline);
OM_HIDDEN void om_tls_error_text(char *buf, size_t n);
OM_HIDDEN void om_tls_push_certificate(lua_State *L, conn_t *c);
OM_HIDDEN void om_tls_push_info(lua_State *L, conn_t *c);

/* conn_io.c */
OM_HIDDEN int om_io_fill(lua_State *L, conn_t *c, size_t want_cap, double deadline);
OM_HIDDEN int om_io_write(lua_State *L, conn_t *c, const char *s, size_t len, size_t *off, double deadline);
OM_HIDDEN void om_io_register(lua_State *L);

/* conn.c */
OM_HIDDEN conn_t *om_conn_new(lua_State *L);
OM_HIDDEN conn_t *om_conn_check_open(lua_State *L, int idx);
OM_HIDDEN void om_conn_release(conn_t *c);
OM_HIDDEN int om_conn_fail_timeout(lua_State *L, conn_t *c, const char *what);
OM_HIDDEN void om_format_seconds(char *buf, size_t n, double s);
OM_HIDDEN double om_check_timeout(lua_State *L, int arg, double t);
OM_HIDDEN int om_set_nonblocking(int fd);
OM_HIDDEN int om_push_want(lua_State *L, int want, int fd, double deadline);

/* conn_listen.c */
OM_HIDDEN void om_listener_register(lua_State *L);

#endif
