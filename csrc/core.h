/* core.h — what the primitive families of oauthmail.core share: the error
 * value every function returns on an expected failure, option readers, and
 * the family entry points that core.c walks. */
#ifndef OAUTHMAIL_CORE_H
#define OAUTHMAIL_CORE_H

#include <stddef.h>
#include "compat.h"

#define OM_HIDDEN __attribute__((visibility("hidden")))
#define OM_ERROR_MT "oauthmail.error"

/* Push nil and an error table {kind=, message=, reason=} with the shared error
 * metatable; returns 2 so `return om_fail(...)` ends a lua_CFunction.
 * `reason` is a short machine word ("timeout", "closed", "refused", ...) or NULL. */
OM_HIDDEN int om_fail(lua_State *L, const char *kind, const char *reason,
                      const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* Push the error table only (no nil); leaves it on the stack top. */
OM_HIDDEN void om_push_error(lua_State *L, const char *kind, const char *reason,
                             const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* Option readers for table arguments: return the default when the field is nil,
 * raise a clear argument error when it has the wrong type. */
OM_HIDDEN const char *om_opt_string(lua_State *L, int t, const char *k, const char *def);
OM_HIDDEN lua_Number om_opt_number(lua_State *L, int t, const char *k, lua_Number def);
OM_HIDDEN int om_opt_bool(lua_State *L, int t, const char *k, int def);

/* Push the shared error metatable (made complete on first use). */
OM_HIDDEN void om_error_metatable(lua_State *L);

/* Monotonic clock in seconds. */
OM_HIDDEN double om_now(void);

/* Write all n bytes to a blocking descriptor (a file), through EINTR: 0, or -1 with errno. */
OM_HIDDEN int om_write_all(int fd, const char *p, size_t n);

/* The primitive families; each adds its functions to the table on top. */
OM_HIDDEN void om_conn_open(lua_State *L);
OM_HIDDEN void om_smtp_open(lua_State *L);
OM_HIDDEN void om_resp_open(lua_State *L);
OM_HIDDEN void om_spool_open(lua_State *L);
OM_HIDDEN void om_http_open(lua_State *L);
OM_HIDDEN void om_crypto_open(lua_State *L);
OM_HIDDEN void om_fs_open(lua_State *L);
OM_HIDDEN void om_proc_open(lua_State *L);
/* Adds poll/poll_many to the core table itself (the default waiter). */
OM_HIDDEN void om_poll_open(lua_State *L);

#endif
