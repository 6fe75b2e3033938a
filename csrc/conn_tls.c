/* conn_tls.c — TLS for a connection: contexts from the option table,
 * certificate verification that can explain itself, and the handshake as a
 * step (it never waits: it says whether OpenSSL wants to read or write). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "conn.h"

static int ex_index = -1;  /* SSL ex_data slot holding the conn_t */

void om_tls_init(void) {
  if (ex_index < 0) ex_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

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
void om_tls_error_text(char *buf, size_t n) {
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
SSL_CTX *om_tls_make_ctx(lua_State *L, int t, int server) {
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
    om_tls_error_text(err, sizeof err);
    SSL_CTX_free(ctx);
    om_fail(L, "tls", "certificate", "cannot load certificate '%s': %s", cert, err);
    return NULL;
  }
  if (key && (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
              SSL_CTX_check_private_key(ctx) != 1)) {
    om_tls_error_text(err, sizeof err);
    SSL_CTX_free(ctx);
    om_fail(L, "tls", "certificate", "cannot load private key '%s': %s", key, err);
    return NULL;
  }
  if (verify) {
    int ok = (ca_file || ca_path) ? SSL_CTX_load_verify_locations(ctx, ca_file, ca_path)
                                  : SSL_CTX_set_default_verify_paths(ctx);
    if (ok != 1) {
      om_tls_error_text(err, sizeof err);
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
  om_tls_error_text(err, sizeof err);
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

/* Prepare the handshake; the context is owned by the connection from here on. */
int om_tls_begin(lua_State *L, conn_t *c, SSL_CTX *ctx, int server, const char *name) {
  c->ssl = SSL_new(ctx);
  c->ctx = ctx;
  c->server = server;
  if (name != c->name) snprintf(c->name, sizeof c->name, "%s", name ? name : "");
  memset(&c->vinfo, 0, sizeof c->vinfo);
  if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) {
    om_fail(L, "tls", "setup", "cannot create a TLS session");
    return STEP_FAILED;
  }
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
  c->state = CS_HANDSHAKE;
  return STEP_DONE;
}

/* One handshake step against the deadline. */
int om_tls_step(lua_State *L, conn_t *c, double deadline) {
  int rc, e;
  ERR_clear_error();
  rc = c->server ? SSL_accept(c->ssl) : SSL_connect(c->ssl);
  if (rc == 1) {
    c->state = CS_OPEN;
    return STEP_DONE;
  }
  e = SSL_get_error(c->ssl, rc);
  if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
    fail_handshake(L, c, e, c->name);
    return STEP_FAILED;
  }
  ERR_clear_error();
  if (om_now() >= deadline) {
    om_conn_fail_timeout(L, c, "in the TLS handshake with");
    return STEP_FAILED;
  }
  return e == SSL_ERROR_WANT_READ ? STEP_WANT_READ : STEP_WANT_WRITE;
}

static void set_str(lua_State *L, const char *k, const char *v) {
  lua_pushstring(L, v);
  lua_setfield(L, -2, k);
}

static void push_san(void *ud, const char *type, const char *value) {
  lua_State *L = (lua_State *)ud;
  lua_pushfstring(L, "%s:%s", type, value);
  lua_rawseti(L, -2, (int)om_rawlen(L, -2) + 1);
}

void om_tls_push_certificate(lua_State *L, conn_t *c) {
  X509 *x;
  char buf[512], fp[3 * EVP_MAX_MD_SIZE + 1];
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0, i;
  if (!c->ssl || !(x = SSL_get1_peer_certificate(c->ssl))) {
    lua_pushnil(L);
    return;
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
}

void om_tls_push_info(lua_State *L, conn_t *c) {
  const char *sni;
  if (!c->ssl) {
    lua_pushnil(L);
    return;
  }
  lua_newtable(L);
  set_str(L, "protocol", SSL_get_version(c->ssl));
  set_str(L, "cipher", SSL_get_cipher_name(c->ssl));
  sni = SSL_get_servername(c->ssl, TLSEXT_NAMETYPE_host_name);
  if (sni) set_str(L, "servername", sni);
}

