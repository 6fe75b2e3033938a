/* proc.c — sys.proc: a shell command run as a child process whose pipe never
 * makes us wait. The command stores and key sources run their commands here
 * (lua/oauthmail/store/shell.lua) instead of through io.popen, which blocks
 * the whole Lua state until the command ends: a slow secret manager then
 * froze a host's event loop.
 *
 * spawn(cmd, env, mode) starts `/bin/sh -c cmd` with posix_spawn (safe in a
 * threaded host, unlike a fork that runs code before exec). One pipe joins
 * us to the child: in mode "r" it is the child's standard output (standard
 * input is /dev/null), in mode "w" its standard input (standard output is
 * /dev/null). Standard error is inherited, and the child gets the default
 * action for the signals a host commonly ignores (SIGPIPE).
 *
 * A process with a controlling terminal (someone at a shell) keeps the child
 * in its own process group, so a command that asks on the terminal still
 * can (a child in another group would be stopped by SIGTTIN). Without one
 * (cron, a service, a server's worker) the child leads a group of its own,
 * and a kill ends the whole pipeline the command started, not only the
 * shell: a secret manager that hangs leaves nothing behind.
 *
 * The exit status travels on a second pipe: the shell runs the command in a
 * subshell and then prints `$?` on descriptor 3, which the command itself
 * does not see. A host may reap children it did not start (nginx's SIGCHLD
 * handler calls waitpid(-1) in every worker): waitpid then fails with
 * ECHILD, yet the status still arrives. waitpid serves only to reap, and
 * for a shell that died before it printed (killed).
 *
 * Every method is a step: read and write return the descriptor to wait on
 * when the pipe is not ready, and exit returns false and the descriptor
 * that tells when to ask again (the status pipe, a pidfd on Linux 5.3 or
 * later, or none: the caller sleeps in between). Lua waits through
 * oauthmail.wait. A proc that is collected before its child was reaped
 * kills the child and reaps it, so no zombie is left. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "compat.h"
#include "core.h"

extern char **environ;

#define PROC_TYPE "oauthmail.proc"
#define PROC_READ_MAX 65536
#define PROC_ENV_MAX 64

typedef struct {
  pid_t pid;     /* 0 once reaped */
  int fd;        /* our end of the pipe, -1 when closed */
  int sfd;       /* the status pipe, -1 when closed */
  int pidfd;     /* -1 when none */
  int status;    /* the exit code once known: exit status, or 128 + signal; -1 before */
  int slen;      /* bytes in sbuf */
  char sbuf[12]; /* what the shell printed on the status pipe */
  char mode;     /* 'r' or 'w' */
  char group;    /* the child leads its own process group */
} om_proc;

static void close_fd(int *fd) {
  if (*fd >= 0) {
    close(*fd);
    *fd = -1;
  }
}

static int code_of(int st) {
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  return 255;
}

/* Reap without waiting: 1 when the child has ended (or somebody else
 * reaped it), 0 while it runs, -1 on an error (errno). The code waitpid
 * gives counts only when the status pipe said nothing. */
static int reap(om_proc *p) {
  int st;
  pid_t r;
  if (p->pid == 0) return 1;
  do r = waitpid(p->pid, &st, WNOHANG); while (r < 0 && errno == EINTR);
  if (r == 0) return 0;
  if (r < 0) {
    if (errno != ECHILD) return -1;
    st = 255 << 8;   /* reaped by the host: its code is lost (the status pipe has it) */
  }
  if (p->status < 0 && p->sfd < 0) p->status = code_of(st);
  p->pid = 0;
  close_fd(&p->pidfd);
  return 1;
}

static void kill_child(om_proc *p) {
  if (p->pid > 0 && reap(p) == 0) kill(p->group ? -p->pid : p->pid, SIGKILL);
}

static void proc_release(om_proc *p) {
  close_fd(&p->fd);
  close_fd(&p->sfd);
  if (p->pid > 0 && reap(p) == 0) {
    int st;
    /* a shell that printed its status is ending by itself: leave what the
     * command left running alone; any other is stopped */
    if (p->status < 0) kill_child(p);
    while (waitpid(p->pid, &st, 0) < 0 && errno == EINTR) {}
    p->pid = 0;
  }
  close_fd(&p->pidfd);
}

static om_proc *check_proc(lua_State *L) {
  return (om_proc *)luaL_checkudata(L, 1, PROC_TYPE);
}

/* A descriptor we keep must not be 0, 1 or 2, where posix_spawn's dup2
 * onto that same number would leave it close-on-exec in the child. */
static int above_stdio(int fd) {
  int moved;
  if (fd > 2) return fd;
  moved = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  close(fd);
  return moved;
}

/* A close-on-exec pipe whose ends are above 0, 1 and 2; on failure both
 * ends are -1 (or closed) and errno says why. */
static int make_pipe(int fds[2]) {
  if (pipe2(fds, O_CLOEXEC) != 0) {
    fds[0] = fds[1] = -1;
    return -1;
  }
  fds[0] = above_stdio(fds[0]);
  fds[1] = above_stdio(fds[1]);
  if (fds[0] < 0 || fds[1] < 0) {
    int err = errno;
    if (fds[0] >= 0) close(fds[0]);
    if (fds[1] >= 0) close(fds[1]);
    fds[0] = fds[1] = -1;
    errno = err;
    return -1;
  }
  return 0;
}

/* envp: ours, without the names `extra` sets, then `extra` ("NAME=value"). */
static char **build_env(const char **extra, int n) {
  size_t count = 0, i, k = 0;
  char **envp;
  for (i = 0; environ && environ[i]; i++) count++;
  envp = (char **)malloc((count + (size_t)n + 1) * sizeof *envp);
  if (!envp) return NULL;
  for (i = 0; i < count; i++) {
    int j, keep = 1;
    for (j = 0; j < n && keep; j++) {
      size_t len = (size_t)(strchr(extra[j], '=') - extra[j]) + 1;
      if (strncmp(environ[i], extra[j], len) == 0) keep = 0;
    }
    if (keep) envp[k++] = environ[i];
  }
  for (i = 0; i < (size_t)n; i++) envp[k++] = (char *)extra[i];
  envp[k] = NULL;
  return envp;
}

/* Whether this process has a controlling terminal someone may be asked on. */
static int has_terminal(void) {
  int fd = open("/dev/tty", O_RDONLY | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) return 0;
  close(fd);
  return 1;
}

/* The shell's script: the command in a subshell without descriptor 3 (new
 * lines, so a trailing comment in it ends there), then its status on 3. */
static const char WRAP_HEAD[] = "(\n";
static const char WRAP_TAIL[] = "\n) 3>&-\nprintf %d \"$?\" >&3\n";

static int spawn_child(om_proc *p, const char *script, char **envp, int child_end, int status_end) {
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  sigset_t none, dfl;
  char *argv[4];
  int rc;
  argv[0] = (char *)"sh";
  argv[1] = (char *)"-c";
  argv[2] = (char *)script;
  argv[3] = NULL;
  sigemptyset(&none);
  sigemptyset(&dfl);
  sigaddset(&dfl, SIGPIPE);
  sigaddset(&dfl, SIGINT);
  sigaddset(&dfl, SIGQUIT);
  sigaddset(&dfl, SIGTERM);
  sigaddset(&dfl, SIGHUP);
  sigaddset(&dfl, SIGCHLD);
  if ((rc = posix_spawn_file_actions_init(&fa)) != 0) return rc;
  if ((rc = posix_spawnattr_init(&at)) != 0) {
    posix_spawn_file_actions_destroy(&fa);
    return rc;
  }
  if (p->mode == 'r') {
    rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (!rc) rc = posix_spawn_file_actions_adddup2(&fa, child_end, 1);
  } else {
    rc = posix_spawn_file_actions_adddup2(&fa, child_end, 0);
    if (!rc) rc = posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  }
  if (!rc) rc = posix_spawn_file_actions_adddup2(&fa, status_end, 3);
  if (!rc) rc = posix_spawnattr_setsigmask(&at, &none);
  if (!rc) rc = posix_spawnattr_setsigdefault(&at, &dfl);
  if (!rc && p->group) rc = posix_spawnattr_setpgroup(&at, 0);
  if (!rc) rc = posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                                   (p->group ? POSIX_SPAWN_SETPGROUP : 0));
  if (!rc) rc = posix_spawn(&p->pid, "/bin/sh", &fa, &at, argv, envp);
  posix_spawnattr_destroy(&at);
  posix_spawn_file_actions_destroy(&fa);
  return rc;
}

/* proc.spawn(cmd, env, mode) -> proc | nil, err
 * env: a list of "NAME=value" strings added to ours; mode "r" or "w". */
static int proc_spawn(lua_State *L) {
  size_t cmd_len;
  const char *cmd = luaL_checklstring(L, 1, &cmd_len);
  const char *mode_s = luaL_checkstring(L, 3);
  const char *extra[PROC_ENV_MAX];
  const char *script;
  int n = 0, fds[2] = { -1, -1 }, sfds[2] = { -1, -1 }, rc, i;
  char **envp;
  om_proc *p;
  luaL_argcheck(L, strlen(cmd) == cmd_len, 1, "the command contains a NUL byte");
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_argcheck(L, (mode_s[0] == 'r' || mode_s[0] == 'w') && !mode_s[1], 3, "mode must be \"r\" or \"w\"");
  n = (int)om_rawlen(L, 2);
  luaL_argcheck(L, n <= PROC_ENV_MAX, 2, "too many environment variables");
  for (i = 0; i < n; i++) {
    lua_rawgeti(L, 2, i + 1);
    extra[i] = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    luaL_argcheck(L, extra[i] && strchr(extra[i], '=') && extra[i][0] != '=', 2,
                  "environment entries must be \"NAME=value\" strings");
    lua_pop(L, 1);   /* a string: the table keeps it alive */
  }
  p = (om_proc *)lua_newuserdata(L, sizeof *p);
  p->pid = 0;
  p->fd = p->sfd = p->pidfd = -1;
  p->status = -1;
  p->slen = 0;
  p->mode = mode_s[0];
  p->group = !has_terminal();
  luaL_getmetatable(L, PROC_TYPE);
  lua_setmetatable(L, -2);
  if (make_pipe(fds) != 0 || make_pipe(sfds) != 0) {
    int err = errno;
    if (fds[0] >= 0) close(fds[0]);
    if (fds[1] >= 0) close(fds[1]);
    return om_fail(L, "system", "io", "cannot make a pipe: %s", strerror(err));
  }
  envp = build_env(extra, n);
  script = lua_pushfstring(L, "%s%s%s", WRAP_HEAD, cmd, WRAP_TAIL);
  rc = envp ? spawn_child(p, script, envp, p->mode == 'r' ? fds[1] : fds[0], sfds[1]) : ENOMEM;
  lua_pop(L, 1);
  free(envp);
  close(p->mode == 'r' ? fds[1] : fds[0]);
  close(sfds[1]);
  p->fd = p->mode == 'r' ? fds[0] : fds[1];
  p->sfd = sfds[0];
  if (rc != 0) {
    p->pid = 0;
    close_fd(&p->fd);
    close_fd(&p->sfd);
    return om_fail(L, "system", "io", "cannot start the command: %s", strerror(rc));
  }
  fcntl(p->fd, F_SETFL, fcntl(p->fd, F_GETFL) | O_NONBLOCK);
  fcntl(p->sfd, F_SETFL, fcntl(p->sfd, F_GETFL) | O_NONBLOCK);
#ifdef SYS_pidfd_open
  p->pidfd = (int)syscall(SYS_pidfd_open, p->pid, 0);
  if (p->pidfd >= 0) fcntl(p->pidfd, F_SETFD, FD_CLOEXEC);
  else p->pidfd = -1;
#endif
  return 1;
}

/* p:read(max) -> string | false (end of output) | true, fd (wait until fd
 * is readable) | nil, err.
 * The buffer is wiped: what a key command prints is a secret. */
static int proc_read(lua_State *L) {
  om_proc *p = check_proc(L);
  lua_Integer max = luaL_optinteger(L, 2, PROC_READ_MAX);
  char buf[PROC_READ_MAX];
  ssize_t n;
  luaL_argcheck(L, p->mode == 'r', 1, "read: the command's output is not ours (mode \"w\")");
  if (max < 1 || max > PROC_READ_MAX) max = PROC_READ_MAX;
  if (p->fd < 0) {
    lua_pushboolean(L, 0);
    return 1;
  }
  do n = read(p->fd, buf, (size_t)max); while (n < 0 && errno == EINTR);
  if (n > 0) {
    lua_pushlstring(L, buf, (size_t)n);
    explicit_bzero(buf, (size_t)n);
    return 1;
  }
  if (n == 0) {
    close_fd(&p->fd);
    lua_pushboolean(L, 0);
    return 1;
  }
  if (errno == EAGAIN || errno == EWOULDBLOCK) {
    lua_pushboolean(L, 1);
    lua_pushinteger(L, p->fd);
    return 2;
  }
  return om_fail(L, "system", "io", "reading the command's output: %s", strerror(errno));
}

/* A write to a pipe whose reader has gone raises SIGPIPE, which would end a
 * host that did not ignore it: hold the signal blocked around the write and
 * take back a SIGPIPE the write itself raised. */
static ssize_t write_quietly(int fd, const char *s, size_t len) {
  sigset_t pipe_only, old, pending;
  ssize_t n;
  int err, was_pending;
  sigemptyset(&pipe_only);
  sigaddset(&pipe_only, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_only, &old);
  sigpending(&pending);
  was_pending = sigismember(&pending, SIGPIPE);
  do n = write(fd, s, len); while (n < 0 && errno == EINTR);
  err = errno;
  if (n < 0 && err == EPIPE && !was_pending) {
    struct timespec zero = { 0, 0 };
    while (sigtimedwait(&pipe_only, NULL, &zero) < 0 && errno == EINTR) {}
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  errno = err;
  return n;
}

/* p:write(data, off) -> new off | off, "w", fd | false (the command stopped
 * reading) | nil, err. off counts the bytes of data already written. */
static int proc_write(lua_State *L) {
  om_proc *p = check_proc(L);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  lua_Integer off = luaL_checkinteger(L, 3);
  ssize_t n;
  luaL_argcheck(L, p->mode == 'w', 1, "write: the command's input is not ours (mode \"r\")");
  luaL_argcheck(L, off >= 0 && (size_t)off <= len, 3, "offset out of range");
  if (p->fd < 0) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if ((size_t)off == len) {
    lua_pushinteger(L, off);
    return 1;
  }
  n = write_quietly(p->fd, s + off, len - (size_t)off);
  if (n >= 0) {
    lua_pushinteger(L, off + n);
    return 1;
  }
  if (errno == EAGAIN || errno == EWOULDBLOCK) {
    lua_pushinteger(L, off);
    lua_pushliteral(L, "w");
    lua_pushinteger(L, p->fd);
    return 3;
  }
  if (errno == EPIPE) {
    close_fd(&p->fd);
    lua_pushboolean(L, 0);
    return 1;
  }
  return om_fail(L, "system", "io", "writing to the command: %s", strerror(errno));
}

/* p:close_pipe(): our end closed (the command sees the end of its input). */
static int proc_close_pipe(lua_State *L) {
  om_proc *p = check_proc(L);
  close_fd(&p->fd);
  return 0;
}

/* The status pipe: 1 when it ended (p->status set if the shell printed a
 * number), 0 when nothing more is there yet, -1 on an error (errno). */
static int read_status(om_proc *p) {
  while (p->sfd >= 0) {
    ssize_t n;
    char c;
    do n = read(p->sfd, &c, 1); while (n < 0 && errno == EINTR);
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    if (n == 1) {
      if (c >= '0' && c <= '9' && p->slen < (int)sizeof p->sbuf - 1) p->sbuf[p->slen++] = c;
      continue;
    }
    close_fd(&p->sfd);
    if (p->slen > 0) {
      p->sbuf[p->slen] = 0;
      p->status = atoi(p->sbuf);
    }
  }
  return 1;
}

/* p:exit() -> code (exit status, or 128 + signal) | false, fd (still
 * running: ask again when fd is readable; no fd: after a pause) | nil, err */
static int proc_exit(lua_State *L) {
  om_proc *p = check_proc(L);
  int r = read_status(p);
  if (r == 0) {
    lua_pushboolean(L, 0);
    lua_pushinteger(L, p->sfd);
    return 2;
  }
  if (r < 0) return om_fail(L, "system", "io", "waiting for the command: %s", strerror(errno));
  r = reap(p);   /* the shell is ending: reap it now if it has */
  if (r < 0) return om_fail(L, "system", "io", "waiting for the command: %s", strerror(errno));
  if (p->status >= 0) {
    lua_pushinteger(L, p->status);
    return 1;
  }
  /* the shell ended without printing (killed): its code is waitpid's */
  lua_pushboolean(L, 0);
  if (p->pidfd < 0) return 1;
  lua_pushinteger(L, p->pidfd);
  return 2;
}

/* p:kill(): SIGKILL to the child if it still runs (to its whole group when
 * it leads one); p:exit() then reaps it. */
static int proc_kill(lua_State *L) {
  kill_child(check_proc(L));
  return 0;
}

static int proc_gc(lua_State *L) {
  proc_release(check_proc(L));
  return 0;
}

static const luaL_Reg proc_methods[] = {
  { "read", proc_read },
  { "write", proc_write },
  { "close_pipe", proc_close_pipe },
  { "exit", proc_exit },
  { "kill", proc_kill },
  { NULL, NULL }
};

static const luaL_Reg proc_metamethods[] = {
  { "__gc", proc_gc },
  { "__close", proc_gc },
  { NULL, NULL }
};

void om_proc_open(lua_State *L) {
  if (luaL_newmetatable(L, PROC_TYPE)) {
    om_setfuncs(L, proc_metamethods);
    om_newlib(L, proc_methods);
    lua_setfield(L, -2, "__index");
  }
  lua_pop(L, 1);
  lua_newtable(L);
  lua_pushcfunction(L, proc_spawn);
  lua_setfield(L, -2, "spawn");
}
