/* spool.c — the durable steps of a maildir-style spool directory: a message
 * is written to tmp/, fsynced, renamed into new/ and the directory fsynced,
 * so a crash at any point leaves either no message or a whole one; moves
 * between the spool's folders are renames followed by a directory fsync; a
 * listing is bounded. Which file goes where is Lua's business (outbox). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "core.h"

#define MAX_NAME 200

static int fail(lua_State *L, int err, const char *what, const char *path) {
  return om_fail(L, "store", err == ENOENT ? "missing" : "io", "%s %s: %s", what, path, strerror(err));
}

static int sync_dir(const char *dir) {
  int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), rc;
  if (dfd < 0) return -1;
  rc = fsync(dfd);
  close(dfd);
  return rc;
}

/* a file name of the spool: no slash, no leading dot, bounded */
static const char *check_name(lua_State *L, int i) {
  size_t n;
  const char *s = luaL_checklstring(L, i, &n);
  luaL_argcheck(L, n > 0 && n <= MAX_NAME && s[0] != '.' && !memchr(s, '/', n) && strlen(s) == n, i,
                "a spool file name has 1 to 200 bytes, no '/', no NUL and no leading '.'");
  return s;
}

/* spool.put(dir, name, data [, test_fault]) -> true | nil, err
 * TEST HOOK: test_fault == "during_put" ends the process after half the
 * data reached tmp/ (a crash mid-enqueue). */
static int spool_put(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  const char *name = check_name(L, 2);
  size_t len;
  const char *data = luaL_checklstring(L, 3, &len);
  const char *fault = luaL_optstring(L, 4, NULL);
  char tmp[4096], dst[4096], newdir[4096];
  int fd, err;
  if ((size_t)snprintf(tmp, sizeof tmp, "%s/tmp/%s", dir, name) >= sizeof tmp
      || (size_t)snprintf(dst, sizeof dst, "%s/new/%s", dir, name) >= sizeof dst
      || (size_t)snprintf(newdir, sizeof newdir, "%s/new", dir) >= sizeof newdir)
    return om_fail(L, "store", "io", "spool path too long: %s", dir);
  fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return fail(L, errno, "cannot create", tmp);
  if (fault && strcmp(fault, "during_put") == 0) {
    if (om_write_all(fd, data, len / 2) == 0) fsync(fd);
    _exit(86);
  }
  if (om_write_all(fd, data, len) != 0 || fsync(fd) != 0) {
    err = errno;
    close(fd);
    unlink(tmp);
    return fail(L, err, "cannot write", tmp);
  }
  if (close(fd) != 0 || rename(tmp, dst) != 0) {
    err = errno;
    unlink(tmp);
    return fail(L, err, "cannot move into the queue", dst);
  }
  if (sync_dir(newdir) != 0) return fail(L, errno, "cannot sync", newdir);
  lua_pushboolean(L, 1);
  return 1;
}

/* spool.move(dir, from, to, name [, newname]) -> true | nil, err: a rename
 * between two folders of the spool, then both folders fsynced. */
static int spool_move(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  const char *from = check_name(L, 2), *to = check_name(L, 3), *name = check_name(L, 4);
  const char *nname = lua_isnoneornil(L, 5) ? name : check_name(L, 5);
  char a[4096], b[4096], da[4096], db[4096];
  if ((size_t)snprintf(a, sizeof a, "%s/%s/%s", dir, from, name) >= sizeof a
      || (size_t)snprintf(b, sizeof b, "%s/%s/%s", dir, to, nname) >= sizeof b
      || (size_t)snprintf(da, sizeof da, "%s/%s", dir, from) >= sizeof da
      || (size_t)snprintf(db, sizeof db, "%s/%s", dir, to) >= sizeof db)
    return om_fail(L, "store", "io", "spool path too long: %s", dir);
  if (rename(a, b) != 0) return fail(L, errno, "cannot move", a);
  if (sync_dir(db) != 0 || sync_dir(da) != 0) return fail(L, errno, "cannot sync", db);
  lua_pushboolean(L, 1);
  return 1;
}

static int cmp(const void *x, const void *y) {
  return strcmp(*(char *const *)x, *(char *const *)y);
}

/* spool.list(folder [, max=100000]) -> sorted names (no dot files) | nil, err */
static int spool_list(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, 100000);
  DIR *d;
  struct dirent *de;
  char **names = NULL;
  size_t n = 0, cap = 0, i;
  luaL_argcheck(L, max >= 0 && max <= 10000000, 2, "max must be from 0 to 10000000");
  d = opendir(path);
  if (!d) return fail(L, errno, "cannot list", path);
  while ((de = readdir(d)) != NULL && n < (size_t)max) {
    if (de->d_name[0] == '.') continue;
    if (n == cap) {
      char **nn;
      cap = cap ? cap * 2 : 64;
      nn = realloc(names, cap * sizeof *names);
      if (!nn) break;
      names = nn;
    }
    names[n] = strdup(de->d_name);
    if (!names[n]) break;
    n++;
  }
  closedir(d);
  if (n) qsort(names, n, sizeof *names, cmp);
  lua_createtable(L, (int)n, 0);
  for (i = 0; i < n; i++) {
    lua_pushstring(L, names[i]);
    lua_rawseti(L, -2, (int)i + 1);
    free(names[i]);
  }
  free(names);
  return 1;
}

/* spool.sync(folder) -> true | nil, err */
static int spool_sync(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  if (sync_dir(path) != 0) return fail(L, errno, "cannot sync", path);
  lua_pushboolean(L, 1);
  return 1;
}

static const luaL_Reg functions[] = {
  { "put", spool_put },
  { "move", spool_move },
  { "list", spool_list },
  { "sync", spool_sync },
  { NULL, NULL }
};

void om_spool_open(lua_State *L) {
  om_setfuncs(L, functions);
}
