/* conn_listen.c — the loopback listener (OAuth redirects, test peers, the
 * sandbox). accept_step takes a waiting connection or says to wait for
 * readability; a TLS listener hands the connection over with its server-side
 * handshake prepared, for the Lua side to run as steps. The listen address is
 * a literal or a name from /etc/hosts, resolved at once. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <openssl/ssl.h>

#include "conn.h"

typedef struct {
  int fd;
  SSL_CTX *ctx;      /* server-side TLS, or NULL */
  double timeout;    /* given to accepted connections */
} listener_t;

static listener_t *check_listener(lua_State *L) {
  return (listener_t *)luaL_checkudata(L, 1, LISTENER_MT);
}

static listener_t *check_open_listener(lua_State *L) {
  listener_t *l = check_listener(L);
  if (l->fd < 0) luaL_error(L, "attempt to use a closed listener");
  return l;
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
  int backlog, one = 1, rc;
  struct addrinfo hints, *res = NULL;
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
    l->ctx = om_tls_make_ctx(L, lua_gettop(L), 1);
    if (!l->ctx) return 2;
  }
  lua_pop(L, 1);
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  rc = getaddrinfo(host, port, &hints, &res);
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
  listener_t *l = check_open_listener(L);
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (getsockname(l->fd, (struct sockaddr *)&ss, &len) != 0)
    return om_fail(L, "network", "error", "getsockname: %s", strerror(errno));
  lua_pushinteger(L, ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                     : ((struct sockaddr_in *)&ss)->sin_port));
  return 1;
}

/* l:accept_step() -> conn (with a TLS handshake to run when configured) |
 * false, fd (wait for it to be readable) | nil, err */
static int listener_accept_step(lua_State *L) {
  listener_t *l = check_open_listener(L);
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  char addr[INET6_ADDRSTRLEN];
  int fd, one = 1;
  conn_t *c;
  for (;;) {
    fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) break;
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      lua_pushboolean(L, 0);
      lua_pushinteger(L, l->fd);
      return 2;
    }
    return om_fail(L, "network", "error", "accept: %s", strerror(errno));
  }
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c = om_conn_new(L);
  c->fd = fd;
  c->state = CS_OPEN;
  c->timeout = l->timeout;  /* accept's wait is not the pace of the conversation */
  if (ss.ss_family == AF_INET6)
    inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, addr, sizeof addr);
  else
    inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, addr, sizeof addr);
  snprintf(c->peer, sizeof c->peer, "client %s", addr);
  if (l->ctx) {
    SSL_CTX_up_ref(l->ctx);
    if (om_tls_begin(L, c, l->ctx, 1, NULL) != STEP_DONE) {
      om_conn_release(c);
      return 2;
    }
  }
  return 1;
}

static int listener_settimeout(lua_State *L) {
  listener_t *l = check_listener(L);
  l->timeout = om_check_timeout(L, 2, luaL_checknumber(L, 2));
  lua_settop(L, 1);
  return 1;
}

static int listener_gettimeout(lua_State *L) {
  lua_pushnumber(L, check_listener(L)->timeout);
  return 1;
}

static int listener_close(lua_State *L) {
  return listener_release(check_listener(L));
}

static const luaL_Reg listener_methods[] = {
  { "port", listener_port },
  { "accept_step", listener_accept_step },
  { "settimeout", listener_settimeout },
  { "gettimeout", listener_gettimeout },
  { "close", listener_close },
  { NULL, NULL }
};

static const luaL_Reg listener_metamethods[] = {
  { "__gc", listener_close },
  { "__close", listener_close },
  { NULL, NULL }
};

static const luaL_Reg listener_functions[] = {
  { "listen", conn_listen },
  { NULL, NULL }
};

/* Adds listen() to the family table on top and registers the class. */
void om_listener_register(lua_State *L) {
  luaL_newmetatable(L, LISTENER_MT);
  om_setfuncs(L, listener_metamethods);
  om_newlib(L, listener_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  om_setfuncs(L, listener_functions);
}
