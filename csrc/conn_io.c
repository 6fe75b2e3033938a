/* conn_io.c — buffered I/O on a connection, as steps. Plain and TLS share one
 * read buffer and one contract: fill() reads what is there now, write() sends
 * what the socket takes now; either says "r" or "w" when it must wait, and
 * gives a timeout error only once the caller's deadline has passed. The
 * takers (lines, byte counts, whatever is there) never do I/O. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "conn.h"

static int grow(lua_State *L, conn_t *c, size_t want_cap) {
  if (c->rpos > 0 && c->rpos == c->rlen) c->rpos = c->rlen = 0;
  if (c->rpos > 0 && (c->rlen == c->rcap || c->rcap < want_cap)) {
    memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
    c->rlen -= c->rpos;
    c->rpos = 0;  /* scanned is relative to rpos: still valid */
  }
  if (want_cap < RBUF_INITIAL) want_cap = RBUF_INITIAL;
  if (c->rcap < want_cap) {
    char *nb = (char *)malloc(want_cap);
    if (!nb) return om_fail(L, "network", "memory", "out of memory reading from %s", c->peer);
    if (c->rbuf) {
      memcpy(nb, c->rbuf, c->rlen);
      OPENSSL_cleanse(c->rbuf, c->rcap);  /* may hold protocol secrets */
      free(c->rbuf);
    }
    c->rbuf = nb;
    c->rcap = want_cap;
  }
  return 0;
}

static int would_block(lua_State *L, conn_t *c, int want, double deadline, const char *what) {
  if (om_now() >= deadline) {
    om_conn_fail_timeout(L, c, what);
    return STEP_FAILED;
  }
  return want;
}

/* Read what is there into the buffer (at least want_cap bytes of room). */
int om_io_fill(lua_State *L, conn_t *c, size_t want_cap, double deadline) {
  if (grow(L, c, want_cap) != 0) return STEP_FAILED;
  for (;;) {
    size_t room = c->rcap - c->rlen;
    if (c->ssl) {
      int n, e;
      ERR_clear_error();
      n = SSL_read(c->ssl, c->rbuf + c->rlen, room > INT32_MAX ? INT32_MAX : (int)room);
      if (n > 0) {
        c->rlen += (size_t)n;
        return STEP_DONE;
      }
      e = SSL_get_error(c->ssl, n);
      if (e == SSL_ERROR_WANT_READ) return would_block(L, c, STEP_WANT_READ, deadline, "waiting for data from");
      if (e == SSL_ERROR_WANT_WRITE) return would_block(L, c, STEP_WANT_WRITE, deadline, "waiting for data from");
      if (e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL ||
          ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ERR_clear_error();
        om_fail(L, "network", "closed", "connection closed by %s", c->peer);
      } else {
        char err[256];
        om_tls_error_text(err, sizeof err);
        om_fail(L, "tls", "error", "TLS error reading from %s: %s", c->peer, err);
      }
      return STEP_FAILED;
    } else {
      ssize_t n = recv(c->fd, c->rbuf + c->rlen, room, 0);
      if (n > 0) {
        c->rlen += (size_t)n;
        return STEP_DONE;
      }
      if (n == 0) {
        om_fail(L, "network", "closed", "connection closed by %s", c->peer);
        return STEP_FAILED;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return would_block(L, c, STEP_WANT_READ, deadline, "waiting for data from");
      om_fail(L, "network", errno == ECONNRESET ? "closed" : "error", "reading from %s: %s", c->peer,
              strerror(errno));
      return STEP_FAILED;
    }
  }
}

/* Send from s+*off what the socket takes now. */
int om_io_write(lua_State *L, conn_t *c, const char *s, size_t len, size_t *off, double deadline) {
  while (*off < len) {
    if (c->ssl) {
      size_t chunk = len - *off > INT32_MAX ? INT32_MAX : len - *off;
      int n, e;
      ERR_clear_error();
      n = SSL_write(c->ssl, s + *off, (int)chunk);
      if (n > 0) {
        *off += (size_t)n;
        continue;
      }
      e = SSL_get_error(c->ssl, n);
      if (e == SSL_ERROR_WANT_WRITE) return would_block(L, c, STEP_WANT_WRITE, deadline, "sending to");
      if (e == SSL_ERROR_WANT_READ) return would_block(L, c, STEP_WANT_READ, deadline, "sending to");
      if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN) {
        ERR_clear_error();
        om_fail(L, "network", "closed", "connection closed by %s while sending", c->peer);
      } else {
        char err[256];
        om_tls_error_text(err, sizeof err);
        om_fail(L, "tls", "error", "TLS error sending to %s: %s", c->peer, err);
      }
      return STEP_FAILED;
    } else {
      ssize_t n = send(c->fd, s + *off, len - *off, MSG_NOSIGNAL);
      if (n >= 0) {
        *off += (size_t)n;
        continue;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return would_block(L, c, STEP_WANT_WRITE, deadline, "sending to");
      om_fail(L, "network", (errno == EPIPE || errno == ECONNRESET) ? "closed" : "error", "sending to %s: %s",
              c->peer, strerror(errno));
      return STEP_FAILED;
    }
  }
  return STEP_DONE;
}

/* ------------------------------------------------------- Lua-facing steps */

static double check_deadline(lua_State *L, int arg) {
  lua_Number d = luaL_checknumber(L, arg);
  luaL_argcheck(L, d == d, arg, "deadline must be a number");
  return (double)d;
}

/* c:fill(deadline [, room]) -> true | "r"|"w", fd | nil, err */
static int io_fill(lua_State *L) {
  conn_t *c = om_conn_check_open(L, 1);
  double deadline = check_deadline(L, 2);
  lua_Integer room = luaL_optinteger(L, 3, 0);
  int rc;
  luaL_argcheck(L, room >= 0 && room <= LINE_HARD_MAX + 2, 3, "room must be between 0 and 16 MiB");
  rc = om_io_fill(L, c, (size_t)room, deadline);
  if (rc == STEP_FAILED) return 2;
  if (rc == STEP_DONE) {
    lua_pushboolean(L, 1);
    return 1;
  }
  return om_push_want(L, rc, c->fd, deadline);
}

/* c:write(s, off, deadline) -> off' (done when off' == #s) [, "r"|"w", fd] | nil, err */
static int io_write(lua_State *L) {
  conn_t *c = om_conn_check_open(L, 1);
  size_t len, off;
  const char *s = luaL_checklstring(L, 2, &len);
  lua_Integer o = luaL_checkinteger(L, 3);
  double deadline = check_deadline(L, 4);
  int rc;
  luaL_argcheck(L, o >= 0 && (size_t)o <= len, 3, "offset out of range");
  off = (size_t)o;
  rc = om_io_write(L, c, s, len, &off, deadline);
  if (rc == STEP_FAILED) return 2;
  lua_pushinteger(L, (lua_Integer)off);
  if (rc == STEP_DONE) return 1;
  om_push_want(L, rc, c->fd, deadline);
  return 4;
}

/* c:take_line(max) -> line | false (need more) | nil, err (too long) */
static int io_take_line(lua_State *L) {
  conn_t *c = om_conn_check_open(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, LINE_DEFAULT);
  char *start, *lf;
  size_t avail;
  if (max < 1 || max > LINE_HARD_MAX) luaL_argerror(L, 2, "line limit must be between 1 and 16 MiB");
  start = c->rbuf ? c->rbuf + c->rpos : NULL;
  avail = c->rlen - c->rpos;
  if (c->scanned > avail) c->scanned = 0;
  lf = avail > c->scanned ? (char *)memchr(start + c->scanned, '\n', avail - c->scanned) : NULL;
  if (lf) {
    size_t len = (size_t)(lf - start);
    size_t line = (len > 0 && start[len - 1] == '\r') ? len - 1 : len;
    if (line > (size_t)max) goto too_long;
    lua_pushlstring(L, start, line);
    c->rpos += len + 1;
    c->scanned = 0;
    return 1;
  }
  c->scanned = avail;
  if (avail > (size_t)max + 1) goto too_long;  /* +1 leaves room for a CR before the LF */
  lua_pushboolean(L, 0);
  return 1;
too_long:
  c->scanned = 0;
  return om_fail(L, "network", "too_long", "line from %s exceeds %ld bytes", c->peer, (long)max);
}

/* c:take(n) -> exactly n bytes | false */
static int io_take(lua_State *L) {
  conn_t *c = om_conn_check_open(L, 1);
  lua_Integer n = luaL_checkinteger(L, 2);
  if (n < 0 || n > LINE_HARD_MAX) luaL_argerror(L, 2, "byte count must be between 0 and 16 MiB");
  if (c->rlen - c->rpos < (size_t)n) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushlstring(L, c->rbuf ? c->rbuf + c->rpos : "", (size_t)n);
  c->rpos += (size_t)n;
  c->scanned = 0;
  return 1;
}

/* c:take_some(max) -> 1..max bytes | false when nothing is buffered */
static int io_take_some(lua_State *L) {
  conn_t *c = om_conn_check_open(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, 65536);
  size_t avail, take;
  if (max < 1) luaL_argerror(L, 2, "size must be positive");
  avail = c->rlen - c->rpos;
  if (avail == 0) {
    lua_pushboolean(L, 0);
    return 1;
  }
  take = avail < (size_t)max ? avail : (size_t)max;
  lua_pushlstring(L, c->rbuf + c->rpos, take);
  c->rpos += take;
  c->scanned = 0;
  return 1;
}

static const luaL_Reg io_methods[] = {
  { "fill", io_fill },
  { "write", io_write },
  { "take_line", io_take_line },
  { "take", io_take },
  { "take_some", io_take_some },
  { NULL, NULL }
};

/* Adds the I/O methods to the method table on top. */
void om_io_register(lua_State *L) {
  om_setfuncs(L, io_methods);
}
