/* conn.c — the connection object: TCP and TLS, client and loopback server
 * side. It never waits. connect_step, handshake_step, fill and write do what
 * can be done now and otherwise return what they wait for ("r" or "w", the
 * fd, the deadline); lua/oauthmail/conn.lua loops over them through the one
 * waiter (lua/oauthmail/wait.lua). The pieces live in conn_resolve.c,
 * conn_tcp.c, conn_tls.c, conn_io.c and conn_listen.c (see conn.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "conn.h"

/* ------------------------------------------------------------- shared helpers */

/* Timeouts are positive, finite and at most a day: NaN or 1e300 must not
 * turn into a deadline that never comes. */
double om_check_timeout(lua_State *L, int arg, double t) {
  if (!(t > 0) || !isfinite(t) || t > 86400)
    luaL_argerror(L, arg, "timeout must be a number of seconds greater than 0 and at most 86400");
  return t;
}

void om_format_seconds(char *buf, size_t n, double s) {
  if (s == (double)(long)s) snprintf(buf, n, "%ld s", (long)s);
  else snprintf(buf, n, "%.3g s", s);
}

/* The message states the configured timeout, whatever part of it was left
 * when the step gave up. */
int om_conn_fail_timeout(lua_State *L, conn_t *c, const char *what) {
  char secs[32];
  om_format_seconds(secs, sizeof secs, c->timeout);
  return om_fail(L, "network", "timeout", "timed out after %s %s %s", secs, what, c->peer);
}

int om_set_nonblocking(int fd) {
  int fl = fcntl(fd, F_GETFL, 0);
  return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int om_push_want(lua_State *L, int want, int fd, double deadline) {
  lua_pushstring(L, want == STEP_WANT_READ ? "r" : "w");
  lua_pushinteger(L, fd);
  lua_pushnumber(L, deadline);
  return 3;
}

/* ------------------------------------------------------------------ objects */

conn_t *om_conn_new(lua_State *L) {
  conn_t *c = (conn_t *)lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  c->fd = -1;  /* closed until the resource is acquired */
  c->state = CS_NEW;
  c->timeout = 10;
  om_setmetatable(L, CONN_MT);
  return c;
}

static conn_t *check_conn(lua_State *L) {
  return (conn_t *)luaL_checkudata(L, 1, CONN_MT);
}

conn_t *om_conn_check_open(lua_State *L, int idx) {
  conn_t *c = (conn_t *)luaL_checkudata(L, idx, CONN_MT);
  if (c->state == CS_CLOSED || (c->state == CS_OPEN && c->fd < 0))
    luaL_error(L, "attempt to use a closed connection");
  return c;
}

void om_conn_release(conn_t *c) {
  if (c->job) {
    om_resolve_abandon(c->job);
    c->job = NULL;
  }
  if (c->addrs) {
    freeaddrinfo(c->addrs);
    c->addrs = c->cur = NULL;
  }
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
  c->rpos = c->rlen = c->rcap = c->scanned = 0;
  c->state = CS_CLOSED;
}

/* ------------------------------------------------------------------ connect */

/* core.conn.new{host=, port=, tls=, timeout=, servername=, ...} -> conn | nil, err
 * Checks the options and builds the TLS context; no I/O until connect_step. */
static int conn_new(lua_State *L) {
  const char *host, *tls, *servername;
  double timeout;
  conn_t *c;
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
  if (strlen(host) >= sizeof c->host) luaL_error(L, "option 'host': too long");
  c = om_conn_new(L);  /* before the context, so an allocation error leaks nothing */
  c->timeout = timeout;
  snprintf(c->host, sizeof c->host, "%s", host);
  snprintf(c->port, sizeof c->port, "%ld", (long)portn);
  snprintf(c->name, sizeof c->name, "%s", servername ? servername : host);
  snprintf(c->peer, sizeof c->peer, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, c->port);
  if (strcmp(tls, "implicit") == 0) {
    c->ctx = om_tls_make_ctx(L, 1, 0);
    if (!c->ctx) return 2;
  }
  return 1;
}

/* c:connect_step() -> true | "r"|"w", fd, deadline | nil, err
 * Resolution, TCP connect and (tls = "implicit") the handshake share one
 * deadline, set by the first call. */
static int conn_connect_step(lua_State *L) {
  conn_t *c = check_conn(L);
  int rc, fd = -1;
  double deadline = 0;
  if (c->state == CS_CLOSED) luaL_error(L, "attempt to use a closed connection");
  if (c->state == CS_OPEN) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (c->state == CS_NEW) {
    c->deadline = om_now() + c->timeout;
    rc = om_resolve_start(c->host, c->port, &c->job, &c->addrs);
    if (rc != 0) {
      om_conn_release(c);
      return om_fail(L, "network", rc == EAI_AGAIN ? "dns_temporary" : "dns", "cannot resolve host '%s': %s", c->host,
                     rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
    }
    c->state = CS_RESOLVING;
  }
  if (c->state == CS_RESOLVING || c->state == CS_CONNECTING) {
    rc = om_tcp_step(L, c, &fd, &deadline);
    if (rc == STEP_FAILED) {
      om_conn_release(c);
      return 2;
    }
    if (rc != STEP_DONE) return om_push_want(L, rc, fd, deadline);
    if (!c->ctx) {
      c->state = CS_OPEN;
      lua_pushboolean(L, 1);
      return 1;
    }
    if (om_tls_begin(L, c, c->ctx, 0, c->name) != STEP_DONE) {
      om_conn_release(c);
      return 2;
    }
  }
  rc = om_tls_step(L, c, c->deadline);
  if (rc == STEP_FAILED) {
    om_conn_release(c);
    return 2;
  }
  if (rc != STEP_DONE) return om_push_want(L, rc, c->fd, c->deadline);
  lua_pushboolean(L, 1);
  return 1;
}

/* c:starttls{...} -> true | nil, err: prepares the upgrade in place
 * ({server=true, cert=, key=} for the server side); handshake_step runs it. */
static int conn_starttls(lua_State *L) {
  conn_t *c = om_conn_check_open(L, 1);
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
  ctx = om_tls_make_ctx(L, 2, server);
  if (!ctx) return 2;
  if (om_tls_begin(L, c, ctx, server, name) != STEP_DONE) {
    om_conn_release(c);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* c:handshake_step(deadline) -> true | "r"|"w", fd, deadline | nil, err (the connection is closed) */
static int conn_handshake_step(lua_State *L) {
  conn_t *c = om_conn_check_open(L, 1);
  double deadline = luaL_checknumber(L, 2);
  int rc;
  if (c->state == CS_OPEN) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (c->state != CS_HANDSHAKE) luaL_error(L, "handshake_step: no handshake under way");
  rc = om_tls_step(L, c, deadline);
  if (rc == STEP_FAILED) {
    om_conn_release(c);
    return 2;
  }
  if (rc != STEP_DONE) return om_push_want(L, rc, c->fd, deadline);
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------ information */

static int conn_peer_certificate(lua_State *L) {
  om_tls_push_certificate(L, om_conn_check_open(L, 1));
  return 1;
}

static int conn_tls_info(lua_State *L) {
  om_tls_push_info(L, om_conn_check_open(L, 1));
  return 1;
}

static int conn_settimeout(lua_State *L) {
  conn_t *c = check_conn(L);
  c->timeout = om_check_timeout(L, 2, luaL_checknumber(L, 2));
  lua_settop(L, 1);
  return 1;
}

static int conn_gettimeout(lua_State *L) {
  lua_pushnumber(L, check_conn(L)->timeout);
  return 1;
}

static int conn_peer(lua_State *L) {
  lua_pushstring(L, check_conn(L)->peer);
  return 1;
}

static int conn_is_tls(lua_State *L) {
  lua_pushboolean(L, check_conn(L)->ssl != NULL);
  return 1;
}

static int conn_is_closed(lua_State *L) {
  lua_pushboolean(L, check_conn(L)->state == CS_CLOSED);
  return 1;
}

static int conn_pending(lua_State *L) {
  conn_t *c = check_conn(L);
  lua_pushinteger(L, (lua_Integer)(c->rlen - c->rpos));
  return 1;
}

static int conn_close(lua_State *L) {
  conn_t *c = check_conn(L);
  if (c->ssl && c->fd >= 0 && c->state == CS_OPEN) SSL_shutdown(c->ssl);  /* best effort close_notify, never waits */
  ERR_clear_error();
  om_conn_release(c);
  return 0;
}

static int conn_tostring(lua_State *L) {
  conn_t *c = check_conn(L);
  lua_pushfstring(L, "oauthmail.conn (%s%s)", c->state == CS_CLOSED ? "closed " : c->ssl ? "tls " : "",
                  c->peer[0] ? c->peer : "?");
  return 1;
}

/* ------------------------------------------------------------ registration */

static const luaL_Reg conn_methods[] = {
  { "connect_step", conn_connect_step },
  { "starttls", conn_starttls },
  { "handshake_step", conn_handshake_step },
  { "peer_certificate", conn_peer_certificate },
  { "tls_info", conn_tls_info },
  { "settimeout", conn_settimeout },
  { "gettimeout", conn_gettimeout },
  { "peer", conn_peer },
  { "is_tls", conn_is_tls },
  { "is_closed", conn_is_closed },
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

static const luaL_Reg conn_functions[] = {
  { "new", conn_new },
  { NULL, NULL }
};

void om_conn_open(lua_State *L) {
  /* A peer that closes while we write must give an error, not kill the host
   * process; OpenSSL writes with write(2), where MSG_NOSIGNAL can't be passed.
   * Only change the disposition if nobody set one (as LuaSocket does). */
  struct sigaction old;
  if (sigaction(SIGPIPE, NULL, &old) == 0 && old.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  om_tls_init();
  luaL_newmetatable(L, CONN_MT);
  om_setfuncs(L, conn_metamethods);
  om_newlib(L, conn_methods);
  om_io_register(L);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  om_listener_register(L);
  om_setfuncs(L, conn_functions);
}
