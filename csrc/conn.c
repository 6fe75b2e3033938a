/* conn.c — TCP and TLS connections (client and loopback server side).
 *
 * Sockets are non-blocking; every blocking step goes through wait_fd(), the
 * one place where the code waits, against a deadline. A later scheduler can
 * replace that wait with a yield without touching the rest. Plain and TLS
 * connections share one read buffer and one send/receive contract. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core.h"

#define CONN_MT "oauthmail.conn"
#define LISTENER_MT "oauthmail.listener"
#define LINE_DEFAULT 8192
#define LINE_HARD_MAX (16 * 1024 * 1024)
#define RBUF_INITIAL 16384

typedef struct {
  int code;          /* X509 verification error of the first failing certificate */
  int depth;
  char subject[256];
  char names[256];   /* the leaf's DNS/IP names, for a host name mismatch */
  char not_before[32];
  char not_after[32];
} verify_info;

typedef struct {
  int fd;            /* -1 once closed */
  SSL *ssl;
  SSL_CTX *ctx;
  double timeout;    /* seconds for each blocking operation */
  char *rbuf;        /* received, not yet consumed bytes: rbuf[rpos..rlen) */
  size_t rpos, rlen, rcap;
  char peer[300];    /* "host:port", for messages */
  verify_info vinfo;
} conn_t;

typedef struct {
  int fd;
  SSL_CTX *ctx;      /* server-side TLS, or NULL */
  double timeout;
} listener_t;

static int ex_index = -1;  /* SSL ex_data slot holding the conn_t */

/* ------------------------------------------------------------------ waiting */

/* The one place that blocks. Returns 0 when ready, 1 on timeout, -1 on error. */
static int wait_fd(int fd, short events, double deadline) {
  for (;;) {
    struct pollfd p;
    double left = deadline - om_now();
    int ms, rc;
    if (left <= 0) return 1;
    ms = left >= (double)(INT_MAX / 1000 - 1) ? INT_MAX : (int)(left * 1000.0) + 1;
    p.fd = fd;
    p.events = events;
    p.revents = 0;
    rc = poll(&p, 1, ms);
    if (rc > 0) return 0;
    if (rc == 0) continue;  /* re-check the clock; poll may round down */
    if (errno != EINTR) return -1;
  }
}

/* Timeouts are positive, finite and at most a day: NaN or 1e300 must not
 * turn into a negative poll() wait that never ends. */
static double check_timeout(lua_State *L, int arg, double t) {
  if (!(t > 0) || !isfinite(t) || t > 86400)
    luaL_argerror(L, arg, "timeout must be a number of seconds greater than 0 and at most 86400");
  return t;
}

static void format_seconds(char *buf, size_t n, double s) {
  if (s == (double)(long)s) snprintf(buf, n, "%ld s", (long)s);
  else snprintf(buf, n, "%.3g s", s);
}

static int fail_timeout(lua_State *L, conn_t *c, const char *what) {
  char secs[32];
  format_seconds(secs, sizeof secs, c->timeout);
  return om_fail(L, "network", "timeout", "timed out after %s %s %s", secs, what, c->peer);
}

/* ------------------------------------------------------------------ objects */

static conn_t *new_conn(lua_State *L) {
  conn_t *c = (conn_t *)lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  c->fd = -1;  /* closed until the resource is acquired */
  c->timeout = 10;
  om_setmetatable(L, CONN_MT);
  return c;
}

static conn_t *check_conn(lua_State *L) {
  return (conn_t *)luaL_checkudata(L, 1, CONN_MT);
}

static conn_t *check_open(lua_State *L) {
  conn_t *c = check_conn(L);
  if (c->fd < 0) luaL_error(L, "attempt to use a closed connection");
  return c;
}

static void conn_release(conn_t *c) {
  if (c->ssl) {
    SSL_free(c->ssl);
    c->ssl = NULL;
  }
  if (c->ctx) {
    SSL_CTX_free(c->ctx);
    c->ctx = NULL;
  }
  if (c->fd >= 0) {
    close(c->fd);
    c->fd = -1;
  }
  if (c->rbuf) {
    OPENSSL_cleanse(c->rbuf, c->rcap);  /* may hold protocol secrets */
    free(c->rbuf);
    c->rbuf = NULL;
  }
  c->rpos = c->rlen = c->rcap = 0;
}

static int set_nonblocking(int fd) {
  int fl = fcntl(fd, F_GETFL, 0);
  return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* ------------------------------------------------------------- resolution */

#ifdef __GLIBC__
/* getaddrinfo_a lets name resolution honour the deadline. The request block
 * owns copies of its strings, so it can be abandoned if it cannot be cancelled. */
typedef struct {
  struct gaicb cb;
  struct addrinfo hints;
  char host[256];
  char port[16];
} resolve_req;

static int resolve(const char *host, const char *port, double deadline,
                   struct addrinfo **out, int *timed_out) {
  resolve_req *r = (resolve_req *)calloc(1, sizeof *r);
  struct gaicb *list[1];
  int rc;
  *timed_out = 0;
  if (!r) return EAI_MEMORY;
  snprintf(r->host, sizeof r->host, "%s", host);
  snprintf(r->port, sizeof r->port, "%s", port);
  r->hints.ai_family = AF_UNSPEC;
  r->hints.ai_socktype = SOCK_STREAM;
  /* No AI_ADDRCONFIG: it hides ::1 when no global IPv6 address exists. An
   * address the machine cannot reach fails at once and the next one is tried. */
  r->hints.ai_flags = 0;
  r->cb.ar_name = r->host;
  r->cb.ar_service = r->port;
  r->cb.ar_request = &r->hints;
  list[0] = &r->cb;
  rc = getaddrinfo_a(GAI_NOWAIT, list, 1, NULL);
  if (rc != 0) {
    free(r);
    return rc;
  }
  for (;;) {
    double left = deadline - om_now();
    struct timespec ts;
    rc = gai_error(&r->cb);
    if (rc != EAI_INPROGRESS) break;
    if (left <= 0) {
      if (gai_cancel(&r->cb) == EAI_NOTCANCELED) {
        *timed_out = 1;
        return EAI_AGAIN;  /* still running in the resolver thread: leave it the block */
      }
      rc = gai_error(&r->cb);
      if (rc == 0) break;  /* finished while we cancelled */
      free(r);
      *timed_out = 1;
      return EAI_AGAIN;
    }
    ts.tv_sec = (time_t)left;
    ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
    gai_suspend((const struct gaicb *const *)list, 1, &ts);
  }
  *out = r->cb.ar_result;
  free(r);
  return rc;
}
#else
static int resolve(const char *host, const char *port, double deadline,
                   struct addrinfo **out, int *timed_out) {
  struct addrinfo hints;
  (void)deadline;
  *timed_out = 0;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  return getaddrinfo(host, port, &hints, out);
}
#endif

/* Connect to the first address that answers. Leaves c->fd open on success. */
static int tcp_connect(lua_State *L, conn_t *c, const char *host, const char *port, double deadline) {
  struct addrinfo *res = NULL, *ai;
  int timed_out, rc, last_err = 0, n_addr = 0, saw_refused = 0, saw_timeout = 0;
  rc = resolve(host, port, deadline, &res, &timed_out);
  if (timed_out) {
    char secs[32];
    format_seconds(secs, sizeof secs, c->timeout);
    return om_fail(L, "network", "timeout", "timed out after %s resolving host '%s'", secs, host);
  }
  if (rc != 0) {
    /* "dns": the name does not exist (not worth a retry); EAI_AGAIN may heal */
    return om_fail(L, "network", rc == EAI_AGAIN ? "dns_temporary" : "dns", "cannot resolve host '%s': %s", host,
                   rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
  }
  for (ai = res; ai; ai = ai->ai_next) n_addr++;
  /* Each address left gets an equal share of the time left, the last one all
   * of it: one black-holed address (a broken IPv6 route) must not use up the
   * deadline the others need. */
  for (ai = res; ai; ai = ai->ai_next, n_addr--) {
    double now = om_now();
    double slot = n_addr > 1 ? now + (deadline - now) / n_addr : deadline;
    int fd, one = 1, w;
    if (now >= deadline) {
      saw_timeout = 1;
      break;
    }
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_err = errno;
      continue;
    }
    set_nonblocking(fd);
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last_err = errno;
      close(fd);
      continue;
    }
    w = wait_fd(fd, POLLOUT, slot);
    if (w == 0) {
      int soerr = 0;
      socklen_t len = sizeof soerr;
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
      if (soerr == 0) {
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        freeaddrinfo(res);
        return 0;
      }
      last_err = soerr;
    } else if (w == 1) {
      saw_timeout = 1;
    } else {
      last_err = errno;
    }
    if (last_err == ECONNREFUSED) saw_refused = 1;
    close(fd);
  }
  freeaddrinfo(res);
  if (saw_refused)
    return om_fail(L, "network", "refused", "connection refused by %s", c->peer);
  if (saw_timeout) return fail_timeout(L, c, "connecting to");
  return om_fail(L, "network", "unreachable", "cannot connect to %s: %s", c->peer,
                 last_err ? strerror(last_err) : "no usable address");
}

/* ---------------------------------------------------------------- TLS setup */

static void asn1_time_str(const ASN1_TIME *t, char *buf, size_t n, int date_only) {
  struct tm tm;
  buf[0] = '\0';
  if (t && ASN1_TIME_to_tm(t, &tm))
    strftime(buf, n, date_only ? "%Y-%m-%d" : "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void name_str(X509_NAME *name, char *buf, size_t n) {
  BIO *b = BIO_new(BIO_s_mem());
  long len;
  char *data;
  buf[0] = '\0';
  if (!b) return;
  X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253);
  len = BIO_get_mem_data(b, &data);
  if (len > 0) snprintf(buf, n, "%.*s", (int)len, data);
  BIO_free(b);
}

/* Walk the subjectAltName entries; calls fn for each DNS or IP name. */
static void each_san(X509 *x, void (*fn)(void *ud, const char *type, const char *value), void *ud) {
  GENERAL_NAMES *names = (GENERAL_NAMES *)X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
  int i;
  if (!names) return;
  for (i = 0; i < sk_GENERAL_NAME_num(names); i++) {
    const GENERAL_NAME *g = sk_GENERAL_NAME_value(names, i);
    char buf[INET6_ADDRSTRLEN + 1];
    if (g->type == GEN_DNS) {
      const unsigned char *s = ASN1_STRING_get0_data(g->d.dNSName);
      int len = ASN1_STRING_length(g->d.dNSName);
      snprintf(buf, sizeof buf, "%.*s", len, (const char *)s);
      fn(ud, "DNS", buf);
    } else if (g->type == GEN_IPADD) {
      int len = ASN1_STRING_length(g->d.iPAddress);
      const unsigned char *p = ASN1_STRING_get0_data(g->d.iPAddress);
      if (len == 4) inet_ntop(AF_INET, p, buf, sizeof buf);
      else if (len == 16) inet_ntop(AF_INET6, p, buf, sizeof buf);
      else continue;
      fn(ud, "IP", buf);
    }
  }
  GENERAL_NAMES_free(names);
}

static void append_name(void *ud, const char *type, const char *value) {
  char *buf = (char *)ud;
  size_t used = strlen(buf);
  (void)type;
  if (used + strlen(value) + 3 >= 256) return;
  snprintf(buf + used, 256 - used, "%s%s", used ? ", " : "", value);
}

/* Records the first verification failure so the error can say what was wrong
 * with which certificate; the handshake still fails as OpenSSL decides. */
static int verify_cb(int ok, X509_STORE_CTX *store) {
  SSL *ssl = (SSL *)X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
  conn_t *c = ssl ? (conn_t *)SSL_get_ex_data(ssl, ex_index) : NULL;
  if (!ok && c && c->vinfo.code == 0) {
    X509 *cert = X509_STORE_CTX_get_current_cert(store);
    verify_info *v = &c->vinfo;
    v->code = X509_STORE_CTX_get_error(store);
    v->depth = X509_STORE_CTX_get_error_depth(store);
    if (cert) {
      name_str(X509_get_subject_name(cert), v->subject, sizeof v->subject);
      asn1_time_str(X509_get0_notBefore(cert), v->not_before, sizeof v->not_before, 1);
      asn1_time_str(X509_get0_notAfter(cert), v->not_after, sizeof v->not_after, 1);
      each_san(cert, append_name, v->names);
      if (!v->names[0]) {
        int idx = X509_NAME_get_index_by_NID(X509_get_subject_name(cert), NID_commonName, -1);
        if (idx >= 0) {
          ASN1_STRING *cn = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(X509_get_subject_name(cert), idx));
          snprintf(v->names, sizeof v->names, "%.*s", ASN1_STRING_length(cn),
                   (const char *)ASN1_STRING_get0_data(cn));
        }
      }
    }
  }
  return ok;
}

static int parse_tls_version(const char *s) {
  if (!s || strcmp(s, "1.2") == 0) return TLS1_2_VERSION;
  if (strcmp(s, "1.3") == 0) return TLS1_3_VERSION;
  if (strcmp(s, "1.1") == 0) return TLS1_1_VERSION;
  if (strcmp(s, "1.0") == 0) return TLS1_VERSION;
  return -1;
}

/* Message for the error OpenSSL left in its queue; clears the queue. */
static void ssl_error_text(char *buf, size_t n) {
  unsigned long e = ERR_peek_last_error();
  buf[0] = '\0';
  if (e) {
    const char *reason = ERR_reason_error_string(e);
    snprintf(buf, n, "%s", reason ? reason : "unknown TLS error");
  }
  ERR_clear_error();
}

/* Build a client or server context from the option table at index t.
 * Returns NULL after pushing nil, err (return 2 from the caller). */
static SSL_CTX *make_ctx(lua_State *L, int t, int server) {
  const char *min = om_opt_string(L, t, "min_tls", "1.2");
  const char *ca_file = om_opt_string(L, t, "ca_file", NULL);
  const char *ca_path = om_opt_string(L, t, "ca_path", NULL);
  const char *cert = om_opt_string(L, t, server ? "cert" : "client_cert", NULL);
  const char *key = om_opt_string(L, t, server ? "key" : "client_key", NULL);
  const char *ciphers = om_opt_string(L, t, "ciphers", NULL);
  int verify = om_opt_bool(L, t, "verify", !server);
  int version = parse_tls_version(min);
  char err[256];
  SSL_CTX *ctx;
  if (version < 0) {
    om_fail(L, "config", "option", "min_tls: expected \"1.0\", \"1.1\", \"1.2\" or \"1.3\", got '%s'", min);
    return NULL;
  }
  ERR_clear_error();
  ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (!ctx) {
    om_fail(L, "tls", "setup", "cannot create a TLS context");
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, version);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  if (version < TLS1_2_VERSION) SSL_CTX_set_security_level(ctx, 0);  /* asked for explicitly */
  if (ciphers && !SSL_CTX_set_cipher_list(ctx, ciphers)) {
    SSL_CTX_free(ctx);
    om_fail(L, "config", "option", "ciphers: OpenSSL accepts none of '%s'", ciphers);
    return NULL;
  }
  if (server && (!cert || !key)) {
    SSL_CTX_free(ctx);
    om_fail(L, "config", "option", "server-side TLS needs both cert and key");
    return NULL;
  }
  if (cert && SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
    ssl_error_text(err, sizeof err);
    SSL_CTX_free(ctx);
    om_fail(L, "tls", "certificate", "cannot load certificate '%s': %s", cert, err);
    return NULL;
  }
  if (key && (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
              SSL_CTX_check_private_key(ctx) != 1)) {
    ssl_error_text(err, sizeof err);
    SSL_CTX_free(ctx);
    om_fail(L, "tls", "certificate", "cannot load private key '%s': %s", key, err);
    return NULL;
  }
  if (verify) {
    int ok = (ca_file || ca_path) ? SSL_CTX_load_verify_locations(ctx, ca_file, ca_path)
                                  : SSL_CTX_set_default_verify_paths(ctx);
    if (ok != 1) {
      ssl_error_text(err, sizeof err);
      SSL_CTX_free(ctx);
      om_fail(L, "tls", "ca", "cannot load trusted certificates from '%s': %s",
              ca_file ? ca_file : ca_path ? ca_path : "the system store", err);
      return NULL;
    }
    SSL_CTX_set_verify(ctx, server ? (SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT) : SSL_VERIFY_PEER,
                       verify_cb);
  } else {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  }
  return ctx;
}

static int is_ip_literal(const char *s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

/* Explain a failed handshake in words a person understands. */
static int fail_handshake(lua_State *L, conn_t *c, int sslerr, const char *name) {
  verify_info *v = &c->vinfo;
  unsigned long e = ERR_peek_last_error();
  int reason = e ? ERR_GET_REASON(e) : 0;
  char err[256];
  long vr = c->ssl ? SSL_get_verify_result(c->ssl) : X509_V_OK;
  if (v->code == 0 && vr != X509_V_OK) v->code = (int)vr;
  ssl_error_text(err, sizeof err);
  if (v->code != 0) {
    switch (v->code) {
    case X509_V_ERR_CERT_HAS_EXPIRED:
      return om_fail(L, "tls", "verify", "certificate has expired (notAfter %s) for %s%s%s",
                     v->not_after, c->peer, v->depth ? ", in the chain: " : "", v->depth ? v->subject : "");
    case X509_V_ERR_CERT_NOT_YET_VALID:
      return om_fail(L, "tls", "verify", "certificate is not valid yet (notBefore %s) for %s",
                     v->not_before, c->peer);
    case X509_V_ERR_HOSTNAME_MISMATCH:
    case X509_V_ERR_IP_ADDRESS_MISMATCH:
      return om_fail(L, "tls", "verify", "host name mismatch: certificate is for %s, not '%s'",
                     v->names[0] ? v->names : v->subject, name);
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
      return om_fail(L, "tls", "verify", "certificate is not trusted: self-signed certificate (%s) from %s",
                     v->subject, c->peer);
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
      return om_fail(L, "tls", "verify",
                     "certificate is not trusted: its issuer is not in the trusted CA store (%s) from %s",
                     v->subject, c->peer);
    default:
      return om_fail(L, "tls", "verify", "certificate verification failed: %s (%s) from %s",
                     X509_verify_cert_error_string(v->code), v->subject, c->peer);
    }
  }
  if (reason == SSL_R_UNSUPPORTED_PROTOCOL || reason == SSL_R_TLSV1_ALERT_PROTOCOL_VERSION ||
      reason == SSL_R_NO_PROTOCOLS_AVAILABLE || reason == SSL_R_VERSION_TOO_LOW)
    return om_fail(L, "tls", "protocol", "%s does not support an allowed TLS version (minimum is TLS 1.2 unless min_tls says otherwise): %s",
                   c->peer, err);
  if (reason == SSL_R_WRONG_VERSION_NUMBER || reason == SSL_R_PACKET_LENGTH_TOO_LONG)
    return om_fail(L, "tls", "handshake", "%s did not answer with TLS (%s): is this a plain-text or STARTTLS port?",
                   c->peer, err);
  if (sslerr == SSL_ERROR_SYSCALL || sslerr == SSL_ERROR_ZERO_RETURN || reason == SSL_R_UNEXPECTED_EOF_WHILE_READING)
    return om_fail(L, "tls", "closed", "connection closed by %s during the TLS handshake", c->peer);
  return om_fail(L, "tls", "handshake", "TLS handshake with %s failed: %s", c->peer, err[0] ? err : "unknown error");
}

/* Run the handshake against the deadline. 0 on success, else pushed nil, err. */
static int tls_handshake(lua_State *L, conn_t *c, SSL_CTX *ctx, int server, const char *name, double deadline) {
  c->ssl = SSL_new(ctx);
  c->ctx = ctx;  /* owned by the connection from here on */
  memset(&c->vinfo, 0, sizeof c->vinfo);
  if (!c->ssl || !SSL_set_fd(c->ssl, c->fd))
    return om_fail(L, "tls", "setup", "cannot create a TLS session");
  SSL_set_ex_data(c->ssl, ex_index, c);
  if (!server && name) {
    X509_VERIFY_PARAM *param = SSL_get0_param(c->ssl);
    if (is_ip_literal(name)) {
      X509_VERIFY_PARAM_set1_ip_asc(param, name);
    } else {
      SSL_set_tlsext_host_name(c->ssl, name);
      X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
      X509_VERIFY_PARAM_set1_host(param, name, 0);
    }
  }
  ERR_clear_error();
  for (;;) {
    int rc = server ? SSL_accept(c->ssl) : SSL_connect(c->ssl);
    int e, w;
    if (rc == 1) return 0;
    e = SSL_get_error(c->ssl, rc);
    if (e == SSL_ERROR_WANT_READ) w = wait_fd(c->fd, POLLIN, deadline);
    else if (e == SSL_ERROR_WANT_WRITE) w = wait_fd(c->fd, POLLOUT, deadline);
    else return fail_handshake(L, c, e, name ? name : "");
    if (w == 1) return fail_timeout(L, c, "in the TLS handshake with");
    if (w < 0) return om_fail(L, "network", "error", "waiting on %s: %s", c->peer, strerror(errno));
  }
}

/* ------------------------------------------------------------------ connect */

static int conn_connect(lua_State *L) {
  const char *host, *tls, *servername;
  char port[16];
  double timeout, deadline;
  conn_t *c;
  SSL_CTX *ctx = NULL;
  lua_Number portn;
  luaL_checktype(L, 1, LUA_TTABLE);
  host = om_opt_string(L, 1, "host", NULL);
  portn = om_opt_number(L, 1, "port", -1);
  tls = om_opt_string(L, 1, "tls", "none");
  timeout = om_opt_number(L, 1, "timeout", 10);
  servername = om_opt_string(L, 1, "servername", NULL);
  if (!host) luaL_error(L, "option 'host' is required");
  if (portn < 0 || portn > 65535 || portn != (lua_Number)(long)portn)
    luaL_error(L, "option 'port': expected a port number 0-65535");
  if (!(timeout > 0) || !isfinite(timeout) || timeout > 86400)
    luaL_error(L, "option 'timeout': expected a number of seconds greater than 0 and at most 86400");
  if (strcmp(tls, "none") != 0 && strcmp(tls, "implicit") != 0)
    luaL_error(L, "option 'tls': expected \"none\" or \"implicit\", got '%s'", tls);
  snprintf(port, sizeof port, "%ld", (long)portn);
  deadline = om_now() + timeout;
  c = new_conn(L);  /* before the context, so an allocation error leaks nothing */
  c->timeout = timeout;
  if (strcmp(tls, "implicit") == 0) {
    ctx = make_ctx(L, 1, 0);
    if (!ctx) return 2;
  }
  snprintf(c->peer, sizeof c->peer, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
  if (tcp_connect(L, c, host, port, deadline) != 0) {
    if (ctx) SSL_CTX_free(ctx);
    return 2;
  }
  if (ctx && tls_handshake(L, c, ctx, 0, servername ? servername : host, deadline) != 0) {
    conn_release(c);
    return 2;
  }
  return 1;
}

/* conn:starttls{...} upgrades in place; {server=true, cert=, key=} for the server side. */
static int conn_starttls(lua_State *L) {
  conn_t *c = check_open(L);
  int server;
  const char *name;
  SSL_CTX *ctx;
  if (lua_isnoneornil(L, 2)) {
    lua_settop(L, 1);
    lua_newtable(L);
  }
  luaL_checktype(L, 2, LUA_TTABLE);
  server = om_opt_bool(L, 2, "server", 0);
  name = om_opt_string(L, 2, "servername", om_opt_string(L, 2, "host", NULL));
  if (c->ssl) return om_fail(L, "tls", "state", "connection to %s is already encrypted", c->peer);
  if (!server && !name) luaL_error(L, "starttls: option 'servername' (or 'host') is required to verify the server");
  if (c->rpos < c->rlen)  /* CVE-2011-0411 class: plain-text bytes must not become "encrypted" */
    return om_fail(L, "tls", "injection",
                   "%s sent data after its STARTTLS reply and before the TLS handshake; refusing to continue",
                   c->peer);
  ctx = make_ctx(L, 2, server);
  if (!ctx) return 2;
  if (tls_handshake(L, c, ctx, server, name, om_now() + c->timeout) != 0) {
    conn_release(c);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---------------------------------------------------------------- reading */

/* Read more bytes into the buffer. 0 = got some, else pushed nil, err. */
static int fill(lua_State *L, conn_t *c, double deadline, size_t want_cap) {
  if (c->rpos > 0 && c->rpos == c->rlen) c->rpos = c->rlen = 0;
  if (c->rpos > 0 && (c->rlen == c->rcap || c->rcap < want_cap)) {
    memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
    c->rlen -= c->rpos;
    c->rpos = 0;
  }
  if (want_cap < RBUF_INITIAL) want_cap = RBUF_INITIAL;
  if (c->rcap < want_cap) {
    char *nb = (char *)malloc(want_cap);
    if (!nb) return om_fail(L, "network", "memory", "out of memory reading from %s", c->peer);
    if (c->rbuf) {
      memcpy(nb, c->rbuf, c->rlen);
      OPENSSL_cleanse(c->rbuf, c->rcap);
      free(c->rbuf);
    }
    c->rbuf = nb;
    c->rcap = want_cap;
  }
  for (;;) {
    size_t room = c->rcap - c->rlen;
    int w;
    if (c->ssl) {
      int n, e;
      ERR_clear_error();
      n = SSL_read(c->ssl, c->rbuf + c->rlen, room > INT32_MAX ? INT32_MAX : (int)room);
      if (n > 0) {
        c->rlen += (size_t)n;
        return 0;
      }
      e = SSL_get_error(c->ssl, n);
      if (e == SSL_ERROR_WANT_READ) w = wait_fd(c->fd, POLLIN, deadline);
      else if (e == SSL_ERROR_WANT_WRITE) w = wait_fd(c->fd, POLLOUT, deadline);
      else if (e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL ||
               ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ERR_clear_error();
        return om_fail(L, "network", "closed", "connection closed by %s", c->peer);
      } else {
        char err[256];
        ssl_error_text(err, sizeof err);
        return om_fail(L, "tls", "error", "TLS error reading from %s: %s", c->peer, err);
      }
    } else {
      ssize_t n = recv(c->fd, c->rbuf + c->rlen, room, 0);
      if (n > 0) {
        c->rlen += (size_t)n;
        return 0;
      }
      if (n == 0) return om_fail(L, "network", "closed", "connection closed by %s", c->peer);
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        return om_fail(L, "network", errno == ECONNRESET ? "closed" : "error", "reading from %s: %s",
                       c->peer, strerror(errno));
      w = wait_fd(c->fd, POLLIN, deadline);
    }
    if (w == 1) return fail_timeout(L, c, "waiting for data from");
    if (w < 0) return om_fail(L, "network", "error", "waiting on %s: %s", c->peer, strerror(errno));
  }
}

/* Mark a pending nil, err as "closed in the middle of something", with the partial data. */
static int closed_midway(lua_State *L, conn_t *c, const char *what, const char *partial, size_t n) {
  lua_getfield(L, -1, "reason");
  if (lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "closed") == 0) {
    lua_pop(L, 1);
    lua_pushfstring(L, "connection closed by %s in the middle of %s (%d bytes received)", c->peer, what, (int)n);
    lua_setfield(L, -2, "message");
  } else {
    lua_pop(L, 1);
  }
  lua_pushlstring(L, partial, n);
  lua_setfield(L, -2, "partial");
  return 2;
}

static int conn_receive_line(lua_State *L) {
  conn_t *c = check_open(L);
  lua_Integer max = luaL_optinteger(L, 2, LINE_DEFAULT);
  double deadline = om_now() + c->timeout;
  size_t scanned = 0;
  if (max < 1 || max > LINE_HARD_MAX) luaL_argerror(L, 2, "line limit must be between 1 and 16 MiB");
  for (;;) {
    char *start = c->rbuf + c->rpos;
    size_t avail = c->rlen - c->rpos;
    char *lf = avail > scanned ? (char *)memchr(start + scanned, '\n', avail - scanned) : NULL;
    if (lf) {
      size_t len = (size_t)(lf - start);
      size_t line = (len > 0 && start[len - 1] == '\r') ? len - 1 : len;
      if (line > (size_t)max) break;
      lua_pushlstring(L, start, line);
      c->rpos += len + 1;
      return 1;
    }
    scanned = avail;  /* offsets are relative to rpos, so compaction keeps them valid */
    if (avail > (size_t)max + 1) break;  /* +1 leaves room for a CR before the LF */
    if (fill(L, c, deadline, (size_t)max + 2) != 0) {
      avail = c->rlen - c->rpos;
      c->rpos = c->rlen;
      return avail ? closed_midway(L, c, "a line", c->rbuf + c->rlen - avail, avail) : 2;
    }
  }
  return om_fail(L, "network", "too_long", "line from %s exceeds %ld bytes", c->peer, (long)max);
}

/* Reads accumulate in the connection's own buffer (grown up to the request),
 * so an error pushed by fill() never lands inside a half-built Lua buffer. */
static int conn_receive(lua_State *L) {
  conn_t *c = check_open(L);
  lua_Integer n = luaL_checkinteger(L, 2);
  double deadline = om_now() + c->timeout;
  if (n < 0 || n > LINE_HARD_MAX) luaL_argerror(L, 2, "byte count must be between 0 and 16 MiB");
  while (c->rlen - c->rpos < (size_t)n) {
    if (fill(L, c, deadline, (size_t)n) != 0) {
      size_t got = c->rlen - c->rpos;
      c->rpos = c->rlen;
      return closed_midway(L, c, "a read", c->rbuf ? c->rbuf + c->rlen - got : "", got);
    }
  }
  lua_pushlstring(L, c->rbuf ? c->rbuf + c->rpos : "", (size_t)n);
  c->rpos += (size_t)n;
  return 1;
}

static int conn_receive_some(lua_State *L) {
  conn_t *c = check_open(L);
  lua_Integer max = luaL_optinteger(L, 2, 65536);
  size_t avail, take;
  if (max < 1) luaL_argerror(L, 2, "size must be positive");
  if (c->rpos == c->rlen && fill(L, c, om_now() + c->timeout, 0) != 0) return 2;
  avail = c->rlen - c->rpos;
  take = avail < (size_t)max ? avail : (size_t)max;
  lua_pushlstring(L, c->rbuf + c->rpos, take);
  c->rpos += take;
  return 1;
}

/* ---------------------------------------------------------------- writing */

static int write_all(lua_State *L, conn_t *c, const char *s, size_t len) {
  double deadline = om_now() + c->timeout;
  size_t off = 0;
  while (off < len) {
    int w;
    if (c->ssl) {
      size_t chunk = len - off > INT32_MAX ? INT32_MAX : len - off;
      int n, e;
      ERR_clear_error();
      n = SSL_write(c->ssl, s + off, (int)chunk);
      if (n > 0) {
        off += (size_t)n;
        continue;
      }
      e = SSL_get_error(c->ssl, n);
      if (e == SSL_ERROR_WANT_WRITE) w = wait_fd(c->fd, POLLOUT, deadline);
      else if (e == SSL_ERROR_WANT_READ) w = wait_fd(c->fd, POLLIN, deadline);
      else if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN) {
        ERR_clear_error();
        return om_fail(L, "network", "closed", "connection closed by %s while sending", c->peer);
      } else {
        char err[256];
        ssl_error_text(err, sizeof err);
        return om_fail(L, "tls", "error", "TLS error sending to %s: %s", c->peer, err);
      }
    } else {
      ssize_t n = send(c->fd, s + off, len - off, MSG_NOSIGNAL);
      if (n >= 0) {
        off += (size_t)n;
        continue;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        return om_fail(L, "network", (errno == EPIPE || errno == ECONNRESET) ? "closed" : "error",
                       "sending to %s: %s", c->peer, strerror(errno));
      w = wait_fd(c->fd, POLLOUT, deadline);
    }
    if (w == 1) return fail_timeout(L, c, "sending to");
    if (w < 0) return om_fail(L, "network", "error", "waiting on %s: %s", c->peer, strerror(errno));
  }
  return 0;
}

static int conn_send(lua_State *L) {
  conn_t *c = check_open(L);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  if (write_all(L, c, s, len) != 0) return 2;
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------ information */

static void set_str(lua_State *L, const char *k, const char *v) {
  lua_pushstring(L, v);
  lua_setfield(L, -2, k);
}

static void push_san(void *ud, const char *type, const char *value) {
  lua_State *L = (lua_State *)ud;
  lua_pushfstring(L, "%s:%s", type, value);
  lua_rawseti(L, -2, (int)om_rawlen(L, -2) + 1);
}

static int conn_peer_certificate(lua_State *L) {
  conn_t *c = check_open(L);
  X509 *x;
  char buf[512], fp[3 * EVP_MAX_MD_SIZE + 1];
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0, i;
  if (!c->ssl || !(x = SSL_get1_peer_certificate(c->ssl))) {
    lua_pushnil(L);
    return 1;
  }
  lua_newtable(L);
  name_str(X509_get_subject_name(x), buf, sizeof buf);
  set_str(L, "subject", buf);
  name_str(X509_get_issuer_name(x), buf, sizeof buf);
  set_str(L, "issuer", buf);
  asn1_time_str(X509_get0_notBefore(x), buf, sizeof buf, 0);
  set_str(L, "not_before", buf);
  asn1_time_str(X509_get0_notAfter(x), buf, sizeof buf, 0);
  set_str(L, "not_after", buf);
  lua_newtable(L);
  each_san(x, push_san, L);
  lua_setfield(L, -2, "sans");
  X509_digest(x, EVP_sha256(), md, &mdlen);
  for (i = 0; i < mdlen; i++) snprintf(fp + 3 * i, 4, i + 1 < mdlen ? "%02X:" : "%02X", md[i]);
  fp[mdlen ? 3 * mdlen - 1 : 0] = '\0';
  set_str(L, "fingerprint_sha256", fp);
  X509_free(x);
  return 1;
}

static int conn_tls_info(lua_State *L) {
  conn_t *c = check_open(L);
  const char *sni;
  if (!c->ssl) {
    lua_pushnil(L);
    return 1;
  }
  lua_newtable(L);
  set_str(L, "protocol", SSL_get_version(c->ssl));
  set_str(L, "cipher", SSL_get_cipher_name(c->ssl));
  sni = SSL_get_servername(c->ssl, TLSEXT_NAMETYPE_host_name);
  if (sni) set_str(L, "servername", sni);
  return 1;
}

static int conn_settimeout(lua_State *L) {
  conn_t *c = check_conn(L);
  c->timeout = check_timeout(L, 2, luaL_checknumber(L, 2));
  lua_settop(L, 1);
  return 1;
}

static int conn_getfd(lua_State *L) {
  lua_pushinteger(L, check_conn(L)->fd);
  return 1;
}

static int conn_is_tls(lua_State *L) {
  lua_pushboolean(L, check_conn(L)->ssl != NULL);
  return 1;
}

static int conn_pending(lua_State *L) {
  conn_t *c = check_conn(L);
  lua_pushinteger(L, (lua_Integer)(c->rlen - c->rpos));
  return 1;
}

static int conn_close(lua_State *L) {
  conn_t *c = check_conn(L);
  if (c->ssl && c->fd >= 0) SSL_shutdown(c->ssl);  /* best effort close_notify, never waits */
  conn_release(c);
  return 0;
}

static int conn_tostring(lua_State *L) {
  conn_t *c = check_conn(L);
  lua_pushfstring(L, "oauthmail.conn (%s%s)", c->fd < 0 ? "closed " : c->ssl ? "tls " : "",
                  c->peer[0] ? c->peer : "?");
  return 1;
}

/* ---------------------------------------------------------------- listener */

static listener_t *check_listener(lua_State *L) {
  return (listener_t *)luaL_checkudata(L, 1, LISTENER_MT);
}

static int listener_release(listener_t *l) {
  if (l->ctx) {
    SSL_CTX_free(l->ctx);
    l->ctx = NULL;
  }
  if (l->fd >= 0) {
    close(l->fd);
    l->fd = -1;
  }
  return 0;
}

static int conn_listen(lua_State *L) {
  const char *host;
  char port[16];
  lua_Number portn;
  int backlog, one = 1, rc, timed_out;
  struct addrinfo *res = NULL;
  listener_t *l;
  luaL_checktype(L, 1, LUA_TTABLE);
  host = om_opt_string(L, 1, "host", "127.0.0.1");
  portn = om_opt_number(L, 1, "port", 0);
  backlog = (int)om_opt_number(L, 1, "backlog", 64);
  if (portn < 0 || portn > 65535) luaL_error(L, "option 'port': expected a port number 0-65535");
  snprintf(port, sizeof port, "%ld", (long)portn);
  l = (listener_t *)lua_newuserdata(L, sizeof *l);
  l->fd = -1;
  l->ctx = NULL;
  l->timeout = 10;
  om_setmetatable(L, LISTENER_MT);
  if (om_getfield(L, 1, "tls") == LUA_TTABLE) {
    l->ctx = make_ctx(L, lua_gettop(L), 1);
    if (!l->ctx) return 2;
  }
  lua_pop(L, 1);
  rc = resolve(host, port, om_now() + 10, &res, &timed_out);
  if (rc != 0) {
    listener_release(l);
    return om_fail(L, "network", "dns", "cannot resolve listen address '%s': %s", host, gai_strerror(rc));
  }
  l->fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (l->fd < 0 || setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      bind(l->fd, res->ai_addr, res->ai_addrlen) != 0 || listen(l->fd, backlog) != 0) {
    int e = errno;
    freeaddrinfo(res);
    listener_release(l);
    return om_fail(L, "network", e == EADDRINUSE ? "in_use" : "error", "cannot listen on %s:%s: %s",
                   host, port, strerror(e));
  }
  freeaddrinfo(res);
  return 1;
}

static int listener_port(lua_State *L) {
  listener_t *l = check_listener(L);
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (l->fd < 0) luaL_error(L, "attempt to use a closed listener");
  if (getsockname(l->fd, (struct sockaddr *)&ss, &len) != 0)
    return om_fail(L, "network", "error", "getsockname: %s", strerror(errno));
  lua_pushinteger(L, ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                     : ((struct sockaddr_in *)&ss)->sin_port));
  return 1;
}

/* listener:accept([timeout]) -> conn (TLS already negotiated when configured) | nil, err */
static int listener_accept(lua_State *L) {
  listener_t *l = check_listener(L);
  double timeout = check_timeout(L, 2, luaL_optnumber(L, 2, l->timeout)), deadline;
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  char addr[INET6_ADDRSTRLEN];
  int fd, one = 1;
  conn_t *c;
  if (l->fd < 0) luaL_error(L, "attempt to use a closed listener");
  deadline = om_now() + timeout;
  for (;;) {
    int w;
    fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) break;
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      return om_fail(L, "network", "error", "accept: %s", strerror(errno));
    w = wait_fd(l->fd, POLLIN, deadline);
    if (w == 1) {
      char secs[32];
      format_seconds(secs, sizeof secs, timeout);
      return om_fail(L, "network", "timeout", "timed out after %s waiting for a connection", secs);
    }
    if (w < 0) return om_fail(L, "network", "error", "accept: %s", strerror(errno));
  }
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c = new_conn(L);
  c->fd = fd;
  c->timeout = l->timeout;  /* accept's wait is not the pace of the conversation */
  if (ss.ss_family == AF_INET6)
    inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, addr, sizeof addr);
  else
    inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, addr, sizeof addr);
  snprintf(c->peer, sizeof c->peer, "client %s", addr);
  if (l->ctx) {
    SSL_CTX_up_ref(l->ctx);
    if (tls_handshake(L, c, l->ctx, 1, NULL, deadline) != 0) {
      conn_release(c);
      return 2;
    }
  }
  return 1;
}

static int listener_settimeout(lua_State *L) {
  listener_t *l = check_listener(L);
  l->timeout = check_timeout(L, 2, luaL_checknumber(L, 2));
  lua_settop(L, 1);
  return 1;
}

static int listener_close(lua_State *L) {
  return listener_release(check_listener(L));
}

static int listener_getfd(lua_State *L) {
  lua_pushinteger(L, check_listener(L)->fd);
  return 1;
}

/* ------------------------------------------------------------ registration */

static const luaL_Reg conn_methods[] = {
  { "send", conn_send },
  { "receive_line", conn_receive_line },
  { "receive", conn_receive },
  { "receive_some", conn_receive_some },
  { "starttls", conn_starttls },
  { "peer_certificate", conn_peer_certificate },
  { "tls_info", conn_tls_info },
  { "settimeout", conn_settimeout },
  { "getfd", conn_getfd },
  { "is_tls", conn_is_tls },
  { "pending", conn_pending },
  { "close", conn_close },
  { NULL, NULL }
};

static const luaL_Reg conn_metamethods[] = {
  { "__gc", conn_close },
  { "__close", conn_close },
  { "__tostring", conn_tostring },
  { NULL, NULL }
};

static const luaL_Reg listener_methods[] = {
  { "port", listener_port },
  { "accept", listener_accept },
  { "settimeout", listener_settimeout },
  { "getfd", listener_getfd },
  { "close", listener_close },
  { NULL, NULL }
};

static const luaL_Reg listener_metamethods[] = {
  { "__gc", listener_close },
  { "__close", listener_close },
  { NULL, NULL }
};

static const luaL_Reg conn_functions[] = {
  { "connect", conn_connect },
  { "listen", conn_listen },
  { NULL, NULL }
};

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, const luaL_Reg *meta) {
  luaL_newmetatable(L, name);
  om_setfuncs(L, meta);
  om_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}

void om_conn_open(lua_State *L) {
  /* A peer that closes while we write must give an error, not kill the host
   * process; OpenSSL writes with write(2), where MSG_NOSIGNAL can't be passed.
   * Only change the disposition if nobody set one (as LuaSocket does). */
  struct sigaction old;
  if (sigaction(SIGPIPE, NULL, &old) == 0 && old.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  if (ex_index < 0) ex_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
  new_class(L, CONN_MT, conn_methods, conn_metamethods);
  new_class(L, LISTENER_MT, listener_methods, listener_metamethods);
  om_setfuncs(L, conn_functions);
}
