/* fs.c — the file primitives the token stores stand on: advisory locks with a
 * deadline, crash-safe replacement of a file, permission inspection, private
 * directories and bounded reads. Policy (what is too open, what to lock) lives
 * in lua/oauthmail/store; this file only does the system calls right. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include "core.h"

#define FS_LOCK_TYPE "oauthmail.fs.lock"
#define FS_READ_DEFAULT_MAX (16 * 1024 * 1024)
#define FS_SECRET_BUF "oauthmail.fs.secretbuf"

typedef struct {
  int fd;          /* -1 once unlocked */
} fs_lock;

static int fail_errno(lua_State *L, int err, const char *what, const char *path) {
  const char *reason = err == ENOENT ? "missing" : err == EACCES || err == EPERM ? "denied" : "io";
  return om_fail(L, "store", reason, "%s %s: %s", what, path, strerror(err));
}


/* ---- locks ------------------------------------------------------------ */

static int lock_release(fs_lock *lk) {
  if (lk->fd >= 0) {
    /* closing the descriptor drops the flock; unlocking first makes the
     * release immediate even if a forked child still shares the descriptor */
    flock(lk->fd, LOCK_UN);
    close(lk->fd);
    lk->fd = -1;
    return 1;
  }
  return 0;
}

static int lock_unlock(lua_State *L) {
  fs_lock *lk = (fs_lock *)luaL_checkudata(L, 1, FS_LOCK_TYPE);
  lock_release(lk);
  lua_pushboolean(L, 1);
  return 1;
}

static int lock_gc(lua_State *L) {
  fs_lock *lk = (fs_lock *)luaL_checkudata(L, 1, FS_LOCK_TYPE);
  lock_release(lk);
  return 0;
}

static int lock_held(lua_State *L) {
  fs_lock *lk = (fs_lock *)luaL_checkudata(L, 1, FS_LOCK_TYPE);
  lua_pushboolean(L, lk->fd >= 0);
  return 1;
}

static int lock_tostring(lua_State *L) {
  fs_lock *lk = (fs_lock *)luaL_checkudata(L, 1, FS_LOCK_TYPE);
  lua_pushfstring(L, "oauthmail.fs.lock (%s)", lk->fd >= 0 ? "held" : "released");
  return 1;
}

/* fs.lock_try(path [, {exclusive=true}]) -> lock | false (held elsewhere) | nil, err
 * One flock(2) with LOCK_NB on an open descriptor: it never waits. The wait
 * with a deadline is oauthmail.fs.lock, in Lua, through the one waiter (a
 * blocking flock could hang a process forever behind a stuck peer). */
static int fs_lock_try(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int exclusive = 1;
  fs_lock *lk;
  int fd;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    exclusive = om_opt_bool(L, 2, "exclusive", 1);
  }
  lk = (fs_lock *)lua_newuserdata(L, sizeof *lk);
  lk->fd = -1;   /* closed first: an error below leaves a harmless object */
  om_setmetatable(L, FS_LOCK_TYPE);
  fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return fail_errno(L, errno, "cannot open lock file", path);
  lk->fd = fd;
  for (;;) {
    if (flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0) return 1;
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK) {
      lock_release(lk);
      lua_pushboolean(L, 0);
      return 1;
    }
    {
      int err = errno;
      lock_release(lk);
      return fail_errno(L, err, "cannot lock", path);
    }
  }
}

/* ---- atomic replace ------------------------------------------------------ */

static int fsync_dir_of(const char *path) {
  /* the rename is only durable once the directory entry is on disk */
  char dir[4096];
  const char *slash = strrchr(path, '/');
  int dfd, rc;
  if (!slash) strcpy(dir, ".");
  else if (slash == path) strcpy(dir, "/");
  else {
    size_t n = (size_t)(slash - path);
    if (n >= sizeof dir) { errno = ENAMETOOLONG; return -1; }
    memcpy(dir, path, n);
    dir[n] = '\0';
  }
  dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return -1;
  rc = fsync(dfd);
  close(dfd);
  return rc;
}

/* Temp files "<name>.tmp.<pid>.<hex>" left by a writer that crashed: remove
 * those whose pid no longer runs. A live pid (or our own: another state in
 * this process may be writing) keeps its file; a reused pid only delays the
 * clean-up until that process ends. Failures here never fail the write. */
static void remove_stale_temps(const char *path) {
  const char *slash = strrchr(path, '/');
  const char *base = slash ? slash + 1 : path;
  size_t baselen = strlen(base), dirlen = slash ? (size_t)(slash - path) : 0;
  char dir[4096];
  DIR *d;
  struct dirent *e;
  int scanned = 0;
  if (baselen == 0 || dirlen >= sizeof dir) return;
  if (!slash) strcpy(dir, ".");
  else if (dirlen == 0) strcpy(dir, "/");
  else {
    memcpy(dir, path, dirlen);
    dir[dirlen] = '\0';
  }
  d = opendir(dir);
  if (!d) return;
  /* bounded: a store directory is small; a huge one is not scanned whole */
  while ((e = readdir(d)) != NULL && scanned++ < 10000) {
    const char *p = e->d_name;
    char *end;
    long pid;
    if (strncmp(p, base, baselen) != 0 || strncmp(p + baselen, ".tmp.", 5) != 0) continue;
    p += baselen + 5;
    if (*p < '0' || *p > '9') continue;
    errno = 0;
    pid = strtol(p, &end, 10);
    if (errno || pid <= 0 || pid == (long)getpid() || *end != '.' || !end[1]) continue;
    for (p = end + 1; *p; p++)
      if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) break;
    if (*p) continue;
    if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
    unlinkat(dirfd(d), e->d_name, 0);
  }
  closedir(d);
}

/* fs.atomic_write(path, data, mode [, test_fault]) -> true [, warning] | nil, err
 * Readers see either the old file or the complete new one, never a mix: the
 * data goes to a fresh temp file in the same directory (so rename stays on one
 * file system), is fsynced, renamed over the target, and the directory fsynced.
 * Once the rename succeeded the new data is in place: a failing directory
 * fsync only means it may not survive a power cut, so it is reported as
 * true plus a warning string, not as a failed write.
 * TEST HOOKS, compiled into test builds only (-DOAUTHMAIL_TESTING, make test):
 * test_fault == "during_save" ends the process with _exit(86) after half the
 * data reached the temp file, to prove the old file survives a crash;
 * "dir_sync" makes the directory fsync fail (EIO). A production module
 * refuses any test_fault, so no caller can end the process through it. */
static int fs_atomic_write(lua_State *L) {
  size_t len, plen;
  const char *path = luaL_checklstring(L, 1, &plen);
  const char *data = luaL_checklstring(L, 2, &len);
  mode_t mode = (mode_t)luaL_optinteger(L, 3, 0600);
#ifdef OAUTHMAIL_TESTING
  const char *fault = luaL_optstring(L, 4, NULL);
#endif
  int dir_failed;
  char *tmp;
  int fd = -1, attempt, err;
  size_t tlen = plen + 48;
  if (mode & ~(mode_t)07777) luaL_argerror(L, 3, "mode must be permission bits (e.g. 384 = 0600)");
#ifndef OAUTHMAIL_TESTING
  if (!lua_isnoneornil(L, 4)) luaL_argerror(L, 4, "test faults exist only in test builds (make test)");
#endif
  remove_stale_temps(path);
  tmp = (char *)malloc(tlen);
  if (!tmp) return luaL_error(L, "out of memory");
  for (attempt = 0; attempt < 16 && fd < 0; attempt++) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(tmp, tlen, "%s.tmp.%ld.%lx", path, (long)getpid(),
             (unsigned long)(ts.tv_nsec ^ (attempt * 7919L)));
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    err = errno;
    free(tmp);
    return fail_errno(L, err, "cannot create temporary file next to", path);
  }
  /* open() applied the umask; the caller asked for exactly this mode */
  if (fchmod(fd, mode) != 0) goto fail;
#ifdef OAUTHMAIL_TESTING
  if (fault && strcmp(fault, "during_save") == 0) {
    if (om_write_all(fd, data, len / 2) == 0) fsync(fd);
    _exit(86);
  }
#endif
  if (om_write_all(fd, data, len) != 0) goto fail;
  if (fsync(fd) != 0) goto fail;
  if (close(fd) != 0) { fd = -1; goto fail; }
  fd = -1;
  if (rename(tmp, path) != 0) goto fail;
  free(tmp);
  dir_failed = fsync_dir_of(path) != 0;
#ifdef OAUTHMAIL_TESTING
  if (fault && strcmp(fault, "dir_sync") == 0) {
    errno = EIO;
    dir_failed = 1;
  }
#endif
  if (dir_failed) {
    int derr = errno;
    lua_pushboolean(L, 1);
    lua_pushfstring(L, "%s was replaced, but its directory could not be synced (%s): "
                    "the change may not survive a power cut", path, strerror(derr));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
fail:
  err = errno;
  if (fd >= 0) close(fd);
  unlink(tmp);
  free(tmp);
  return fail_errno(L, err, "cannot write", path);
}

/* ---- inspection ---------------------------------------------------------- */

static const char *type_name(mode_t m) {
  if (S_ISREG(m)) return "file";
  if (S_ISDIR(m)) return "directory";
  if (S_ISLNK(m)) return "link";
  return "other";
}

/* {mode, uid, gid, size, mtime, type}: what stat and read_file report. */
static void push_stat(lua_State *L, const struct stat *st) {
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, (lua_Integer)(st->st_mode & 07777));
  lua_setfield(L, -2, "mode");
  lua_pushinteger(L, (lua_Integer)st->st_uid);
  lua_setfield(L, -2, "uid");
  lua_pushinteger(L, (lua_Integer)st->st_gid);
  lua_setfield(L, -2, "gid");
  lua_pushinteger(L, (lua_Integer)st->st_size);
  lua_setfield(L, -2, "size");
  lua_pushnumber(L, (lua_Number)st->st_mtim.tv_sec + (lua_Number)st->st_mtim.tv_nsec / 1e9);
  lua_setfield(L, -2, "mtime");
  lua_pushstring(L, type_name(st->st_mode));
  lua_setfield(L, -2, "type");
}

/* fs.stat(path [, {follow=true}]) -> {mode=, uid=, gid=, size=, type=, mtime=} | nil, err */
static int fs_stat(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  int follow = 1;
  struct stat st;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    follow = om_opt_bool(L, 2, "follow", 1);
  }
  if ((follow ? stat(path, &st) : lstat(path, &st)) != 0) return fail_errno(L, errno, "cannot stat", path);
  push_stat(L, &st);
  return 1;
}

/* fs.mkdir_private(path) -> true | nil, err
 * mkdir -p where every directory it creates is 0700; existing ones are left
 * as they are (the store checks and reports their permissions itself). */
static int fs_mkdir_private(lua_State *L) {
  size_t n, i;
  const char *path = luaL_checklstring(L, 1, &n);
  char *buf;
  struct stat st;
  if (n == 0) luaL_argerror(L, 1, "empty path");
  buf = (char *)malloc(n + 1);
  if (!buf) return luaL_error(L, "out of memory");
  memcpy(buf, path, n + 1);
  for (i = 1; i <= n; i++) {
    if (buf[i] != '/' && buf[i] != '\0') continue;
    buf[i] = '\0';
    if (mkdir(buf, 0700) == 0) {
      chmod(buf, 0700);  /* the umask may have taken bits away; never adds any */
    } else if (errno != EEXIST || stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) {
      int err = errno == EEXIST ? ENOTDIR : errno;
      lua_pushstring(L, buf);
      free(buf);
      return fail_errno(L, err, "cannot create directory", lua_tostring(L, -1));
    }
    if (i < n) buf[i] = '/';
  }
  free(buf);
  lua_pushboolean(L, 1);
  return 1;
}

/* Read buffers are GC-owned userdata wiped by __gc, so a raise (out of
 * memory while pushing the result) neither leaks nor leaves key bytes. */
static int secretbuf_gc(lua_State *L) {
  void *p = lua_touserdata(L, 1);
  if (p) explicit_bzero(p, (size_t)om_rawlen(L, 1));
  return 0;
}

static char *secretbuf_new(lua_State *L, size_t n) {
  char *p = (char *)lua_newuserdata(L, n);
  om_setmetatable(L, FS_SECRET_BUF);
  return p;
}


/* fs.read_file(path [, max [, {follow=false}]]) -> data, stat | nil, err
 * Never reads more than max bytes. The final path component must not be a
 * symbolic link (unless follow=true) and must be a regular file: a FIFO or a
 * device would block or never end. stat ({mode, uid, gid, size, mtime, type}) comes
 * from fstat on the descriptor that was read, so a permission check on it
 * concerns exactly these bytes (no window between a stat and the open). */
static int fs_read_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, FS_READ_DEFAULT_MAX);
  int follow = 0, fd, err;
  struct stat st;
  size_t total = 0, cap;
  char *buf;
  luaL_argcheck(L, max >= 0 && (lua_Number)max < 4294967296.0, 2, "max out of range");
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    follow = om_opt_bool(L, 3, "follow", 0);
  }
  fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY | (follow ? 0 : O_NOFOLLOW));
  if (fd < 0) {
    err = errno;
    if (err == ELOOP && !follow)
      return om_fail(L, "store", "link", "refusing to read %s: it is a symbolic link", path);
    return fail_errno(L, err, "cannot open", path);
  }
  if (fstat(fd, &st) != 0) {
    err = errno;
    close(fd);
    return fail_errno(L, err, "cannot stat", path);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return om_fail(L, "store", "not_file", "refusing to read %s: it is a %s, not a regular file", path,
                   S_ISDIR(st.st_mode) ? "directory" : S_ISFIFO(st.st_mode) ? "FIFO" : "special file");
  }
  /* one byte more than expected shows a file that grew past the bound */
  cap = (st.st_size >= 0 && (lua_Integer)st.st_size < max ? (size_t)st.st_size : (size_t)max) + 1;
  buf = secretbuf_new(L, cap);
  for (;;) {
    ssize_t r;
    if (total == cap) {
      char *bigger;
      size_t ncap;
      if (total > (size_t)max) break;
      ncap = cap * 2 > (size_t)max + 1 ? (size_t)max + 1 : cap * 2;
      bigger = secretbuf_new(L, ncap);
      memcpy(bigger, buf, total);
      explicit_bzero(buf, cap);
      lua_remove(L, -2);
      buf = bigger;
      cap = ncap;
    }
    r = read(fd, buf + total, cap - total);
    if (r < 0) {
      err = errno;
      if (err == EINTR) continue;
      close(fd);
      explicit_bzero(buf, cap);
      return fail_errno(L, err, "cannot read", path);
    }
    if (r == 0) break;
    total += (size_t)r;
  }
  close(fd);
  if (total > (size_t)max) {
    explicit_bzero(buf, cap);
    return om_fail(L, "store", "too_large", "%s is larger than %ld bytes", path, (long)max);
  }
  lua_pushlstring(L, buf, total);
  explicit_bzero(buf, cap);
  push_stat(L, &st);
  return 2;
}

/* fs.remove(path) -> true | nil, err (a missing file is not an error) */
static int fs_remove(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  if (unlink(path) != 0 && errno != ENOENT) return fail_errno(L, errno, "cannot remove", path);
  lua_pushboolean(L, 1);
  return 1;
}

static int fs_uid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)geteuid());
  return 1;
}

static const luaL_Reg lock_methods[] = {
  { "unlock", lock_unlock },
  { "held", lock_held },
  { NULL, NULL }
};

static const luaL_Reg lock_metamethods[] = {
  { "__gc", lock_gc },
  { "__close", lock_gc },
  { "__tostring", lock_tostring },
  { NULL, NULL }
};

static const luaL_Reg secretbuf_metamethods[] = {
  { "__gc", secretbuf_gc },
  { NULL, NULL }
};

static const luaL_Reg fs_funcs[] = {
  { "lock_try", fs_lock_try },
  { "atomic_write", fs_atomic_write },
  { "stat", fs_stat },
  { "mkdir_private", fs_mkdir_private },
  { "read_file", fs_read_file },
  { "remove", fs_remove },
  { "uid", fs_uid },
  { NULL, NULL }
};

void om_fs_open(lua_State *L) {
  if (luaL_newmetatable(L, FS_LOCK_TYPE)) {
    om_setfuncs(L, lock_metamethods);
    om_newlib(L, lock_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, FS_SECRET_BUF)) om_setfuncs(L, secretbuf_metamethods);
  lua_pop(L, 1);
  om_setfuncs(L, fs_funcs);
}
