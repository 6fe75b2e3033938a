/* conn_resolve.c — name resolution that never blocks the caller.
 *
 * A literal address is converted at once. A name is resolved by
 * getaddrinfo(3) on a detached helper thread that writes one byte to a pipe
 * when it is done: the pipe's read end is what the Lua side waits on, through
 * the same waiter as every socket. The job is shared by the thread and the
 * connection and freed by whichever lets go last, so a connection that is
 * closed (or times out) while the lookup runs simply abandons it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <dlfcn.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#include "conn.h"

struct resolve_job {
  int refs;                  /* thread + connection; atomic */
  int done;                  /* atomic: the result is ready */
  int rc;
  int pipe_r, pipe_w;
  struct addrinfo *result;
  char host[256];
  char port[16];
};

static void job_unref(resolve_job *j) {
  if (__atomic_sub_fetch(&j->refs, 1, __ATOMIC_ACQ_REL) == 0) {
    if (j->result) freeaddrinfo(j->result);
    if (j->pipe_r >= 0) close(j->pipe_r);
    if (j->pipe_w >= 0) close(j->pipe_w);
    free(j);
  }
}

static void hints_for(struct addrinfo *h, int numeric) {
  memset(h, 0, sizeof *h);
  h->ai_family = AF_UNSPEC;
  h->ai_socktype = SOCK_STREAM;
  /* No AI_ADDRCONFIG: it hides ::1 when no global IPv6 address exists. An
   * address the machine cannot reach fails at once and the next one is tried. */
  h->ai_flags = numeric ? (AI_NUMERICHOST | AI_NUMERICSERV) : AI_NUMERICSERV;
}

static void *resolver(void *ud) {
  resolve_job *j = (resolve_job *)ud;
  struct addrinfo hints;
  char one = 1;
  ssize_t n;
  hints_for(&hints, 0);
  j->rc = getaddrinfo(j->host, j->port, &hints, &j->result);
  if (j->rc == EAI_SYSTEM && errno == 0) j->rc = EAI_FAIL;
  __atomic_store_n(&j->done, 1, __ATOMIC_RELEASE);
  do n = write(j->pipe_w, &one, 1); while (n < 0 && errno == EINTR);
  job_unref(j);
  return NULL;
}

/* lua_close unloads this module; a resolver thread still on its way out
 * would then run unmapped code. Pin the module in memory once a thread exists. */
static void pin_module(void) {
  static int pinned = 0;
  Dl_info info;
  if (pinned) return;
  pinned = 1;
  if (dladdr((void *)pin_module, &info) && info.dli_fname) dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
}

static int is_literal(const char *s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

int om_resolve_start(const char *host, const char *port, resolve_job **job, struct addrinfo **out) {
  resolve_job *j;
  int p[2];
  pthread_t t;
  pthread_attr_t attr;
  *job = NULL;
  *out = NULL;
  if (is_literal(host)) {
    struct addrinfo hints;
    hints_for(&hints, 1);
    return getaddrinfo(host, port, &hints, out);  /* no lookup: cannot wait */
  }
  j = (resolve_job *)calloc(1, sizeof *j);
  if (!j) return EAI_MEMORY;
  snprintf(j->host, sizeof j->host, "%s", host);
  snprintf(j->port, sizeof j->port, "%s", port);
  if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) {
    free(j);
    return EAI_SYSTEM;
  }
  j->pipe_r = p[0];
  j->pipe_w = p[1];
  j->refs = 2;
  pin_module();
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  if (pthread_create(&t, &attr, resolver, j) != 0) {
    pthread_attr_destroy(&attr);
    j->refs = 1;
    job_unref(j);
    return EAI_AGAIN;
  }
  pthread_attr_destroy(&attr);
  *job = j;
  return 0;
}

int om_resolve_fd(resolve_job *job) {
  return job->pipe_r;
}

int om_resolve_poll(resolve_job *job, struct addrinfo **out, int *rc) {
  if (!__atomic_load_n(&job->done, __ATOMIC_ACQUIRE)) return 0;
  *rc = job->rc;
  *out = job->result;
  job->result = NULL;
  job_unref(job);
  return 1;
}

void om_resolve_abandon(resolve_job *job) {
  if (job) job_unref(job);
}
