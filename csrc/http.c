/* http.c — one bounded HTTPS request through libcurl's multi interface,
 * driven as steps: start() configures it, step() lets curl do what it can
 * now and returns either the result or what to wait for. curl's sockets are
 * gathered in an epoll set, so the Lua side waits on one descriptor (through
 * oauthmail.wait) until curl's own timer runs out; nothing here waits.
 * Nothing calls back into Lua while curl runs: response headers, body and
 * trace data are collected in C buffers (bounded, wiped when freed) and
 * handed to Lua when the transfer is over, so no Lua error can ever
 * longjmp across libcurl frames. Policy (redaction, form encoding, which
 * URLs are allowed) lives in lua/oauthmail/http.lua. */
#include <errno.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <stdlib.h>
#include <string.h>
#include <curl/curl.h>
#include <openssl/crypto.h>
#include <openssl/x509_vfy.h>
#include "core.h"

#define HTTP_REQUEST "oauthmail.http.request"
#define HEAD_MAX (256 * 1024)          /* one response's header block */
#define TRACE_EVENT_MAX (64 * 1024)    /* bytes kept per trace event */
#define TRACE_TOTAL_MAX (1024 * 1024)  /* bytes kept for all trace events */
#define TRACE_EVENTS_MAX 2000

/* A growable byte buffer whose old copies are wiped: bodies and traces carry
 * tokens and secrets before the Lua layer redacts them. */
struct buf {
  char *p;
  size_t n, cap;
};

static void buf_free(struct buf *b) {
  if (b->p) {
    OPENSSL_cleanse(b->p, b->cap);
    free(b->p);
  }
  b->p = NULL;
  b->n = b->cap = 0;
}

static int buf_add(struct buf *b, const char *s, size_t n) {
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 1024;
    char *p;
    while (cap < b->n + n) cap *= 2;
    p = (char *)malloc(cap);
    if (!p) return 0;
    if (b->n) memcpy(p, b->p, b->n);
    if (b->p) {
      OPENSSL_cleanse(b->p, b->cap);
      free(b->p);
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  return 1;
}

enum ev_type { EV_INFO, EV_HEADER_OUT, EV_DATA_OUT, EV_HEADER_IN, EV_DATA_IN };
static const char *const ev_names[] = { "info", "header_out", "data_out", "header_in", "data_in" };

struct event {
  enum ev_type type;
  struct buf text;
  size_t omitted;  /* bytes seen but not kept (bounds) */
};

typedef struct {
  CURL *curl;
  CURLM *multi;
  int epfd;          /* curl's sockets, as one descriptor to wait on */
  long timer_ms;     /* curl's next timeout, -1 for none */
  int started, finished;
  double timeout;
  struct curl_slist *headers;
  struct buf body, head;
  size_t max_body;
  int too_large, oom, head_too_large, tracing;
  struct event *evs;
  size_t nev, capev, trace_bytes, trace_dropped;
  char host[256];
  char errbuf[CURL_ERROR_SIZE];
} request;

/* The header list holds "Authorization: Bearer ..." in curl's own copies. */
static void headers_free(struct curl_slist *list) {
  struct curl_slist *l;
  for (l = list; l; l = l->next)
    if (l->data) OPENSSL_cleanse(l->data, strlen(l->data));
  curl_slist_free_all(list);
}

static void request_release(request *r) {
  size_t i;
  if (r->multi && r->curl) curl_multi_remove_handle(r->multi, r->curl);
  if (r->curl) curl_easy_cleanup(r->curl);
  r->curl = NULL;
  if (r->multi) curl_multi_cleanup(r->multi);
  r->multi = NULL;
  if (r->epfd >= 0) close(r->epfd);
  r->epfd = -1;
  if (r->headers) headers_free(r->headers);
  r->headers = NULL;
  buf_free(&r->body);
  buf_free(&r->head);
  for (i = 0; i < r->nev; i++) buf_free(&r->evs[i].text);
  free(r->evs);
  r->evs = NULL;
  r->nev = r->capev = 0;
}

static int request_gc(lua_State *L) {
  request_release((request *)luaL_checkudata(L, 1, HTTP_REQUEST));
  return 0;
}

/* Append trace data; chunks of one body are joined into one event. */
static void trace_add(request *r, enum ev_type t, const char *data, size_t n) {
  struct event *ev;
  size_t keep;
  if (r->nev > 0 && (t == EV_DATA_OUT || t == EV_DATA_IN) && r->evs[r->nev - 1].type == t) {
    ev = &r->evs[r->nev - 1];
  } else {
    if (r->nev >= TRACE_EVENTS_MAX) {
      r->trace_dropped++;
      return;
    }
    if (r->nev == r->capev) {
      size_t cap = r->capev ? r->capev * 2 : 32;
      struct event *evs = (struct event *)realloc(r->evs, cap * sizeof *evs);
      if (!evs) return;
      r->evs = evs;
      r->capev = cap;
    }
    ev = &r->evs[r->nev++];
    memset(ev, 0, sizeof *ev);
    ev->type = t;
  }
  keep = n;
  if (ev->text.n + keep > TRACE_EVENT_MAX) keep = TRACE_EVENT_MAX - ev->text.n;
  if (r->trace_bytes + keep > TRACE_TOTAL_MAX) keep = TRACE_TOTAL_MAX - r->trace_bytes;
  if (keep && buf_add(&ev->text, data, keep)) r->trace_bytes += keep;
  else keep = 0;
  ev->omitted += n - keep;
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud) {
  request *r = (request *)ud;
  size_t n = size * nmemb;
  /* Stop at the first byte past the limit: never buffer an oversized body. */
  if (r->tracing) trace_add(r, EV_DATA_IN, data, n);
  if (r->body.n + n > r->max_body) {
    r->too_large = 1;
    return 0;
  }
  if (!buf_add(&r->body, data, n)) {
    r->oom = 1;
    return 0;
  }
  return n;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *ud) {
  request *r = (request *)ud;
  size_t n = size * nmemb;
  /* Keep only the last response's headers (after 1xx and followed redirects). */
  if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
    if (r->head.p) OPENSSL_cleanse(r->head.p, r->head.cap);
    r->head.n = 0;
  }
  if (r->head.n + n > HEAD_MAX) {
    r->head_too_large = 1;
    return 0;
  }
  if (!buf_add(&r->head, data, n)) {
    r->oom = 1;
    return 0;
  }
  return n;
}

static int on_debug(CURL *h, curl_infotype type, char *data, size_t n, void *ud) {
  request *r = (request *)ud;
  (void)h;
  switch (type) {
    case CURLINFO_TEXT: trace_add(r, EV_INFO, data, n); break;
    case CURLINFO_HEADER_OUT: trace_add(r, EV_HEADER_OUT, data, n); break;
    case CURLINFO_DATA_OUT: trace_add(r, EV_DATA_OUT, data, n); break;
    case CURLINFO_HEADER_IN: trace_add(r, EV_HEADER_IN, data, n); break;
    /* The response body is traced from on_body, after chunked decoding;
     * raw TLS records tell a reader nothing. */
    default: break;
  }
  return 0;
}

/* Plain-language TLS verification failures; the X509 code is in the
 * verify result, a host name mismatch only in curl's message. */
static void fail_verify(lua_State *L, request *r) {
  long vr = 0;
  const char *why;
  curl_easy_getinfo(r->curl, CURLINFO_SSL_VERIFYRESULT, &vr);
  /* curl checks the name itself and then reports X509_V_ERR_UNSPECIFIED. */
  if (strstr(r->errbuf, "subject name") || strstr(r->errbuf, "does not match")) vr = X509_V_ERR_HOSTNAME_MISMATCH;
  switch (vr) {
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
      why = "certificate not trusted: the server sent a self-signed certificate (set ca_file to trust it explicitly)";
      break;
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
      why = "certificate not trusted: it was issued by an authority that is not in the trusted CA list "
            "(set ca_file/ca_path, or check for a TLS-intercepting proxy)";
      break;
    case X509_V_ERR_CERT_HAS_EXPIRED:
      why = "certificate expired (check the server's certificate, and this machine's clock)";
      break;
    case X509_V_ERR_CERT_NOT_YET_VALID:
      why = "certificate not yet valid (check this machine's clock)";
      break;
    case X509_V_ERR_HOSTNAME_MISMATCH:
      why = "host name mismatch: the certificate is not valid for this host name";
      break;
    case X509_V_OK:
    case X509_V_ERR_UNSPECIFIED:
      why = r->errbuf[0] ? r->errbuf : "the certificate was rejected";
      break;
    default:
      why = X509_verify_cert_error_string(vr);
  }
  om_fail(L, "tls", "verify", "TLS verification of %s failed: %s", r->host, why);
}

static void fail_curl(lua_State *L, request *r, CURLcode rc, double timeout) {
  long os_errno = 0;
  const char *detail = r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc);
  switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
      om_fail(L, "network", "timeout", "HTTP request to %s timed out after %g s", r->host, timeout);
      break;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
      om_fail(L, "network", "dns", "cannot resolve %s%s (%s)", rc == CURLE_COULDNT_RESOLVE_PROXY ? "the proxy for " : "",
              r->host, detail);
      break;
    case CURLE_COULDNT_CONNECT:
      curl_easy_getinfo(r->curl, CURLINFO_OS_ERRNO, &os_errno);
      om_fail(L, "network", os_errno == ECONNREFUSED ? "refused" : "unreachable",
              "cannot connect to %s (%s)", r->host, detail);
      break;
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
      /* TLS 1.3 servers refuse a client certificate after the handshake,
       * so the refusal arrives as a read error carrying a TLS alert. */
      if (strstr(detail, "certificate required")) {
        om_fail(L, "tls", "client_cert", "%s requires a client certificate (set client_cert and client_key): %s",
                r->host, detail);
        break;
      }
      if (strstr(detail, "alert")) {
        om_fail(L, "tls", "handshake", "%s refused the TLS session (%s)", r->host, detail);
        break;
      }
      /* fall through */
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      om_fail(L, "network", "closed", "the connection to %s closed before the response was complete (%s)",
              r->host, detail);
      break;
    case CURLE_PEER_FAILED_VERIFICATION:
      fail_verify(L, r);
      break;
    case CURLE_SSL_CONNECT_ERROR:
      om_fail(L, "tls", "handshake", "TLS handshake with %s failed (%s)", r->host, detail);
      break;
    case CURLE_SSL_CERTPROBLEM:
      om_fail(L, "config", "client_cert", "cannot use the client certificate or key (%s)", detail);
      break;
    case CURLE_SSL_CACERT_BADFILE:
      om_fail(L, "config", "ca_file", "cannot read the CA file or path (%s)", detail);
      break;
    case CURLE_FILESIZE_EXCEEDED:
      om_fail(L, "http", "too_large", "response body exceeds max_body (%lu bytes)", (unsigned long)r->max_body);
      break;
    case CURLE_TOO_MANY_REDIRECTS:
      om_fail(L, "http", "redirects", "too many redirects from %s", r->host);
      break;
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
      om_fail(L, "config", "url", "unusable URL (%s)", detail);
      break;
    case CURLE_WRITE_ERROR:
      if (r->too_large) {
        om_fail(L, "http", "too_large", "response body exceeds max_body (%lu bytes)", (unsigned long)r->max_body);
        break;
      }
      if (r->head_too_large) {
        om_fail(L, "http", "too_large", "response headers from %s exceed %d bytes", r->host, HEAD_MAX);
        break;
      }
      /* fall through */
    default:
      if (r->oom) luaL_error(L, "out of memory");
      om_fail(L, "network", "error", "HTTP request to %s failed: %s", r->host, detail);
  }
}

static void push_events(lua_State *L, request *r) {
  size_t i;
  lua_createtable(L, (int)r->nev, 0);
  for (i = 0; i < r->nev; i++) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, ev_names[r->evs[i].type]);
    lua_setfield(L, -2, "type");
    lua_pushlstring(L, r->evs[i].text.p ? r->evs[i].text.p : "", r->evs[i].text.n);
    lua_setfield(L, -2, "text");
    lua_pushinteger(L, (lua_Integer)r->evs[i].omitted);
    lua_setfield(L, -2, "omitted");
    lua_rawseti(L, -2, (int)i + 1);
  }
  if (r->trace_dropped) {
    lua_pushinteger(L, (lua_Integer)r->trace_dropped);
    lua_setfield(L, -2, "dropped");
  }
}

/* Response headers as {lower-case name -> value}; repeated names are joined
 * with ", " (RFC 9110 5.3). */
static void push_headers(lua_State *L, request *r) {
  const char *p = r->head.p, *end = r->head.p + r->head.n;
  lua_newtable(L);
  while (p && p < end) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    const char *line_end = eol ? eol : end, *colon, *v, *ve;
    const char *next = eol ? eol + 1 : end;
    if (line_end > p && line_end[-1] == '\r') line_end--;
    colon = memchr(p, ':', (size_t)(line_end - p));
    if (colon && colon > p && !(line_end - p >= 5 && memcmp(p, "HTTP/", 5) == 0)) {
      luaL_Buffer b;
      const char *k;
      v = colon + 1;
      while (v < line_end && (*v == ' ' || *v == '\t')) v++;
      ve = line_end;
      while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
      luaL_buffinit(L, &b);
      for (k = p; k < colon; k++) luaL_addchar(&b, (char)((*k >= 'A' && *k <= 'Z') ? *k + 32 : *k));
      luaL_pushresult(&b);
      lua_pushvalue(L, -1);
      lua_rawget(L, -3);
      if (lua_isstring(L, -1)) {
        lua_pushliteral(L, ", ");
        lua_pushlstring(L, v, (size_t)(ve - v));
        lua_concat(L, 3);
      } else {
        lua_pop(L, 1);
        lua_pushlstring(L, v, (size_t)(ve - v));
      }
      lua_rawset(L, -3);
    }
    p = next;
  }
}

static void add_header(lua_State *L, request *r, const char *line) {
  struct curl_slist *l = curl_slist_append(r->headers, line);
  if (!l) luaL_error(L, "out of memory");
  r->headers = l;
}

static void set_headers(lua_State *L, request *r, int opts) {
  int ty = om_getfield(L, opts, "headers");
  if (ty == LUA_TTABLE) {
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      size_t kn, vn;
      const char *k, *v;
      if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "option 'headers': names and values must be strings");
      k = lua_tolstring(L, -2, &kn);
      v = lua_tolstring(L, -1, &vn);
      if (kn == 0 || strcspn(k, ":\r\n \t") != kn || strlen(k) != kn)
        luaL_error(L, "option 'headers': invalid header name");
      if (strcspn(v, "\r\n") != vn)
        luaL_error(L, "option 'headers': header values must not contain CR, LF or NUL");
      /* "Name;" is curl's way to send a header with an empty value. */
      lua_pushfstring(L, vn ? "%s: %s" : "%s;", k, v);
      add_header(L, r, lua_tostring(L, -1));
      lua_pop(L, 2);
    }
  } else if (ty != LUA_TNIL) {
    luaL_error(L, "option 'headers': expected a table, got %s", luaL_typename(L, -1));
  }
  lua_pop(L, 1);
  /* No "Expect: 100-continue" round trip for request bodies. */
  add_header(L, r, "Expect:");
}

#define SETOPT(opt, val) do { if (curl_easy_setopt(r->curl, (opt), (val)) != CURLE_OK) \
  return luaL_error(L, "libcurl rejected %s", #opt); } while (0)

/* curl tells which sockets it wants watched; they go into the epoll set. */
static int on_socket(CURL *e, curl_socket_t fd, int what, void *ud, void *sockp) {
  request *r = (request *)ud;
  struct epoll_event ev;
  (void)e;
  (void)sockp;
  if (what == CURL_POLL_REMOVE) {
    epoll_ctl(r->epfd, EPOLL_CTL_DEL, fd, NULL);
    return 0;
  }
  memset(&ev, 0, sizeof ev);
  ev.data.fd = fd;
  if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) ev.events |= EPOLLIN;
  if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) ev.events |= EPOLLOUT;
  if (epoll_ctl(r->epfd, EPOLL_CTL_MOD, fd, &ev) != 0 && errno == ENOENT)
    epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev);
  return 0;
}

static int on_timer(CURLM *m, long timeout_ms, void *ud) {
  (void)m;
  ((request *)ud)->timer_ms = timeout_ms;
  return 0;
}

/* core.http.start(opts) -> request (run it with request:step())
 * opts (validated by http.lua): method, url, headers, body, timeout,
 * connect_timeout, ca_file, ca_path, verify, client_cert, client_key,
 * client_key_passphrase, proxy (string or false), follow_redirects,
 * max_body, trace (boolean). */
static int http_start(lua_State *L) {
  request *r;
  const char *url, *method, *body, *s;
  size_t bodyn = 0;
  double timeout, connect_timeout, max_body;
  int verify, follow, ty;
  CURLU *u;
  char *host = NULL;

  luaL_checktype(L, 1, LUA_TTABLE);
  r = (request *)lua_newuserdata(L, sizeof *r);
  memset(r, 0, sizeof *r);
  r->epfd = -1;
  r->timer_ms = -1;
  om_setmetatable(L, HTTP_REQUEST);

  url = om_opt_string(L, 1, "url", NULL);
  if (!url) return luaL_error(L, "option 'url' is required");
  method = om_opt_string(L, 1, "method", "GET");
  timeout = om_opt_number(L, 1, "timeout", 30);
  connect_timeout = om_opt_number(L, 1, "connect_timeout", timeout);
  max_body = om_opt_number(L, 1, "max_body", 1048576);
  verify = om_opt_bool(L, 1, "verify", 1);
  follow = om_opt_bool(L, 1, "follow_redirects", 0);
  r->tracing = om_opt_bool(L, 1, "trace", 0);
  luaL_argcheck(L, timeout > 0 && timeout <= 1e6, 1, "timeout must be in (0, 1e6] seconds");
  luaL_argcheck(L, connect_timeout > 0 && connect_timeout <= 1e6, 1, "connect_timeout must be in (0, 1e6] seconds");
  luaL_argcheck(L, max_body >= 0 && max_body < 4294967296.0, 1, "max_body out of range");
  r->max_body = (size_t)max_body;
  r->timeout = timeout;
  ty = om_getfield(L, 1, "body");
  if (ty == LUA_TSTRING) body = lua_tolstring(L, -1, &bodyn);
  else if (ty == LUA_TNIL) body = NULL;
  else return luaL_error(L, "option 'body': expected a string, got %s", luaL_typename(L, -1));
  lua_pop(L, 1);  /* still referenced by opts, which stays on the stack */

  u = curl_url();
  if (!u) return luaL_error(L, "out of memory");
  if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
    curl_url_cleanup(u);
    return om_fail(L, "config", "url", "invalid URL (expected https://host/path)");
  }
  snprintf(r->host, sizeof r->host, "%s", host);
  curl_free(host);
  curl_url_cleanup(u);

  r->curl = curl_easy_init();
  if (!r->curl) return luaL_error(L, "curl_easy_init failed");
  set_headers(L, r, 1);

  SETOPT(CURLOPT_URL, url);
  SETOPT(CURLOPT_NOSIGNAL, 1L);
  SETOPT(CURLOPT_ERRORBUFFER, r->errbuf);
#if LIBCURL_VERSION_NUM >= 0x075500
  SETOPT(CURLOPT_PROTOCOLS_STR, "http,https");
#else
  SETOPT(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  SETOPT(CURLOPT_TIMEOUT_MS, (long)(timeout * 1000));
  SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long)(connect_timeout * 1000));
  SETOPT(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
  SETOPT(CURLOPT_SSL_VERIFYPEER, verify ? 1L : 0L);
  SETOPT(CURLOPT_SSL_VERIFYHOST, verify ? 2L : 0L);
  SETOPT(CURLOPT_HTTPHEADER, r->headers);
  SETOPT(CURLOPT_USERAGENT, "oauthmail");
  SETOPT(CURLOPT_WRITEFUNCTION, on_body);
  SETOPT(CURLOPT_WRITEDATA, r);
  SETOPT(CURLOPT_HEADERFUNCTION, on_header);
  SETOPT(CURLOPT_HEADERDATA, r);
  /* A declared Content-Length over the limit fails before any body byte. */
  SETOPT(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)r->max_body);
  if (follow) {
    SETOPT(CURLOPT_FOLLOWLOCATION, 1L);
    SETOPT(CURLOPT_MAXREDIRS, 5L);
    /* Never follow an https URL down to plain http. */
#if LIBCURL_VERSION_NUM >= 0x075500
    SETOPT(CURLOPT_REDIR_PROTOCOLS_STR, strncmp(url, "https:", 6) == 0 ? "https" : "http,https");
#else
    SETOPT(CURLOPT_REDIR_PROTOCOLS, strncmp(url, "https:", 6) == 0 ? (long)CURLPROTO_HTTPS
                                                                   : (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  }
  {
    /* As in conn.c: a CA file or path given replaces the system store rather
     * than adding to it, so pinning a private CA really pins it. */
    const char *ca_file = om_opt_string(L, 1, "ca_file", NULL);
    const char *ca_path = om_opt_string(L, 1, "ca_path", NULL);
    if (ca_file || ca_path) {
      SETOPT(CURLOPT_CAINFO, ca_file);
      SETOPT(CURLOPT_CAPATH, ca_path);
    }
  }
  if ((s = om_opt_string(L, 1, "client_cert", NULL))) SETOPT(CURLOPT_SSLCERT, s);
  if ((s = om_opt_string(L, 1, "client_key", NULL))) SETOPT(CURLOPT_SSLKEY, s);
  if ((s = om_opt_string(L, 1, "client_key_passphrase", NULL))) SETOPT(CURLOPT_KEYPASSWD, s);
  ty = om_getfield(L, 1, "proxy");
  if (ty == LUA_TSTRING) {
    SETOPT(CURLOPT_PROXY, lua_tostring(L, -1));
  } else if (ty == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
    SETOPT(CURLOPT_PROXY, "");  /* "" disables proxies, including the environment's */
  } else if (ty != LUA_TNIL) {
    return luaL_error(L, "option 'proxy': expected a URL string or false");
  }
  lua_pop(L, 1);

  if (strcmp(method, "GET") == 0 && !body) {
    SETOPT(CURLOPT_HTTPGET, 1L);
  } else if (strcmp(method, "HEAD") == 0) {
    SETOPT(CURLOPT_NOBODY, 1L);
  } else {
    if (strcmp(method, "POST") != 0) SETOPT(CURLOPT_CUSTOMREQUEST, method);
    if (body || strcmp(method, "POST") == 0) {
      /* copied: the request outlives this call's arguments */
      SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)bodyn);
      SETOPT(CURLOPT_COPYPOSTFIELDS, body ? body : "");
    }
  }
  if (r->tracing) {
    SETOPT(CURLOPT_DEBUGFUNCTION, on_debug);
    SETOPT(CURLOPT_DEBUGDATA, r);
    SETOPT(CURLOPT_VERBOSE, 1L);
  }

  r->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (r->epfd < 0) return luaL_error(L, "epoll_create1: %s", strerror(errno));
  r->multi = curl_multi_init();
  if (!r->multi) return luaL_error(L, "curl_multi_init failed");
  curl_multi_setopt(r->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
  curl_multi_setopt(r->multi, CURLMOPT_SOCKETDATA, r);
  curl_multi_setopt(r->multi, CURLMOPT_TIMERFUNCTION, on_timer);
  curl_multi_setopt(r->multi, CURLMOPT_TIMERDATA, r);
  if (curl_multi_add_handle(r->multi, r->curl) != CURLM_OK) return luaL_error(L, "curl_multi_add_handle failed");
  return 1;
}

static int finish(lua_State *L, request *r, CURLcode rc) {
  long status = 0;
  r->finished = 1;
  if (rc != CURLE_OK) {
    fail_curl(L, r, rc, r->timeout);
    if (r->tracing) push_events(L, r);
    else lua_pushnil(L);
    request_release(r);
    return 3;
  }
  curl_easy_getinfo(r->curl, CURLINFO_RESPONSE_CODE, &status);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)status);
  lua_setfield(L, -2, "status");
  push_headers(L, r);
  lua_setfield(L, -2, "headers");
  lua_pushlstring(L, r->body.p ? r->body.p : "", r->body.n);
  lua_setfield(L, -2, "body");
  {
    char *eff = NULL;
    if (curl_easy_getinfo(r->curl, CURLINFO_EFFECTIVE_URL, &eff) == CURLE_OK && eff) {
      lua_pushstring(L, eff);
      lua_setfield(L, -2, "url");
    }
  }
  if (r->tracing) push_events(L, r);
  else lua_pushnil(L);
  request_release(r);
  return 2;
}

/* request:step() -> response, events | nil, err, events (done) |
 * false, "r", fd, seconds (wait for fd to be readable, at most that long;
 * seconds is nil when curl set no timer) */
static int request_step(lua_State *L) {
  request *r = (request *)luaL_checkudata(L, 1, HTTP_REQUEST);
  int running = 0, n, i;
  CURLMsg *msg;
  if (r->finished || !r->multi) return luaL_error(L, "request:step: the request is over");
  if (!r->started) {
    r->started = 1;
    curl_multi_socket_action(r->multi, CURL_SOCKET_TIMEOUT, 0, &running);
  } else {
    struct epoll_event evs[16];
    do n = epoll_wait(r->epfd, evs, 16, 0); while (n < 0 && errno == EINTR);
    if (n <= 0) {
      curl_multi_socket_action(r->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    } else {
      for (i = 0; i < n; i++) {
        int flags = 0;
        if (evs[i].events & EPOLLIN) flags |= CURL_CSELECT_IN;
        if (evs[i].events & EPOLLOUT) flags |= CURL_CSELECT_OUT;
        if (evs[i].events & (EPOLLERR | EPOLLHUP)) flags |= CURL_CSELECT_ERR;
        curl_multi_socket_action(r->multi, evs[i].data.fd, flags, &running);
      }
    }
  }
  while ((msg = curl_multi_info_read(r->multi, &n)) != NULL) {
    if (msg->msg == CURLMSG_DONE && msg->easy_handle == r->curl) return finish(L, r, msg->data.result);
  }
  lua_pushboolean(L, 0);
  lua_pushliteral(L, "r");
  lua_pushinteger(L, r->epfd);
  if (r->timer_ms >= 0) lua_pushnumber(L, (double)r->timer_ms / 1000.0);
  else lua_pushnil(L);
  return 4;
}

static const luaL_Reg request_methods[] = {
  { "step", request_step },
  { NULL, NULL }
};

static const luaL_Reg request_metamethods[] = {
  { "__gc", request_gc },
#if LUA_VERSION_NUM >= 504
  { "__close", request_gc },
#endif
  { NULL, NULL }
};

static const luaL_Reg http_funcs[] = {
  { "start", http_start },
  { NULL, NULL }
};

void om_http_open(lua_State *L) {
  /* Once per process; libcurl >= 7.84 makes this thread-safe. */
  static int initialised = 0;
  if (!initialised) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) luaL_error(L, "curl_global_init failed");
    initialised = 1;
  }
  if (luaL_newmetatable(L, HTTP_REQUEST)) {
    om_setfuncs(L, request_metamethods);
    om_newlib(L, request_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  om_setfuncs(L, http_funcs);
  {
    curl_version_info_data *vi = curl_version_info(CURLVERSION_NOW);
    lua_pushstring(L, vi && vi->version ? vi->version : "?");
    lua_setfield(L, -2, "curl_version");
  }
}

/* oauthmail.curl: the HTTP family as its own module, loaded by oauthmail.http
 * on first use (see core.c for why it is not part of oauthmail.core). */
__attribute__((visibility("default"))) int luaopen_oauthmail_curl(lua_State *L);

int luaopen_oauthmail_curl(lua_State *L) {
  om_error_metatable(L);
  lua_pop(L, 1);
  lua_newtable(L);
  om_http_open(L);
  return 1;
}
