/* conn_tcp.c — connecting: resolve the name, then try each address in turn.
 * Each address left gets an equal share of the time left, the last one all
 * of it: one black-holed address (a broken IPv6 route) must not use up the
 * deadline the others need. Every call does what can be done now and says
 * what it waits for next. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "conn.h"

/* "dns": the name does not exist (not worth a retry); EAI_AGAIN may heal */
static int fail_resolve(lua_State *L, conn_t *c, int rc) {
  return om_fail(L, "network", rc == EAI_AGAIN ? "dns_temporary" : "dns", "cannot resolve host '%s': %s", c->host,
                 rc == EAI_SYSTEM ? "system error" : gai_strerror(rc));
}

static int fail_all(lua_State *L, conn_t *c) {
  if (c->saw_refused) return om_fail(L, "network", "refused", "connection refused by %s", c->peer);
  if (c->saw_timeout) return om_conn_fail_timeout(L, c, "connecting to");
  return om_fail(L, "network", "unreachable", "cannot connect to %s: %s", c->peer,
                 c->last_err ? strerror(c->last_err) : "no usable address");
}

static void drop_attempt(conn_t *c, int err) {
  if (err) c->last_err = err;
  if (err == ECONNREFUSED) c->saw_refused = 1;
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
}

static int connected(conn_t *c) {
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  freeaddrinfo(c->addrs);
  c->addrs = c->cur = NULL;
  return STEP_DONE;
}

/* Start the next address; STEP_WANT_WRITE while a connect is under way. */
static int next_address(lua_State *L, conn_t *c, int *fd, double *deadline) {
  while (c->cur) {
    struct addrinfo *ai = c->cur;
    double now = om_now();
    c->cur = ai->ai_next;
    if (now >= c->deadline) {
      c->saw_timeout = 1;
      break;
    }
    c->slot = c->n_left > 1 ? now + (c->deadline - now) / c->n_left : c->deadline;
    c->n_left--;
    c->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (c->fd < 0) {
      c->last_err = errno;
      continue;
    }
    if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) == 0) return connected(c);
    if (errno != EINPROGRESS) {
      drop_attempt(c, errno);
      continue;
    }
    *fd = c->fd;
    *deadline = c->slot;
    return STEP_WANT_WRITE;
  }
  freeaddrinfo(c->addrs);
  c->addrs = NULL;
  fail_all(L, c);
  return STEP_FAILED;
}

int om_tcp_step(lua_State *L, conn_t *c, int *fd, double *deadline) {
  double now = om_now();
  if (c->state == CS_RESOLVING) {
    if (c->job) {
      struct addrinfo *res = NULL;
      int rc = 0;
      if (!om_resolve_poll(c->job, &res, &rc)) {
        if (now >= c->deadline) {
          char secs[32];
          om_resolve_abandon(c->job);  /* the thread finishes alone and frees it */
          c->job = NULL;
          om_format_seconds(secs, sizeof secs, c->timeout);
          om_fail(L, "network", "timeout", "timed out after %s resolving host '%s'", secs, c->host);
          return STEP_FAILED;
        }
        *fd = om_resolve_fd(c->job);
        *deadline = c->deadline;
        return STEP_WANT_READ;
      }
      c->job = NULL;
      if (rc != 0) {
        if (res) freeaddrinfo(res);
        fail_resolve(L, c, rc);
        return STEP_FAILED;
      }
      c->addrs = res;
    }
    c->cur = c->addrs;
    for (c->n_left = 0, c->cur = c->addrs; c->cur; c->cur = c->cur->ai_next) c->n_left++;
    c->cur = c->addrs;
    c->state = CS_CONNECTING;
    return next_address(L, c, fd, deadline);
  }
  /* CS_CONNECTING with a connect under way: look, don't wait */
  if (c->fd >= 0) {
    struct pollfd p;
    int rc;
    p.fd = c->fd;
    p.events = POLLOUT;
    p.revents = 0;
    do rc = poll(&p, 1, 0); while (rc < 0 && errno == EINTR);
    if (rc > 0) {
      int soerr = 0;
      socklen_t len = sizeof soerr;
      getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
      if (soerr == 0) return connected(c);
      drop_attempt(c, soerr);
    } else if (rc < 0) {
      drop_attempt(c, errno);
    } else if (now >= c->slot) {
      c->saw_timeout = 1;
      drop_attempt(c, 0);
    } else {
      *fd = c->fd;
      *deadline = c->slot;
      return STEP_WANT_WRITE;
    }
  }
  return next_address(L, c, fd, deadline);
}
