/* b64.h — the one base64 codec (RFC 4648) of oauthmail.core, shared by the
 * crypto functions and the SMTP engine's SASL challenges. Plain C on caller
 * buffers, no Lua: the callers choose where secrets live and wipe them. */
#ifndef OAUTHMAIL_B64_H
#define OAUTHMAIL_B64_H

#include <stddef.h>
#include "core.h"

/* alphabet: standard ('+' '/', '=' padding required) or url ('-' '_',
 * padding optional, never written) */
enum { OM_B64_STD = 0, OM_B64_URL = 1 };

typedef enum {
  OM_B64_OK = 0,
  OM_B64_TOO_MUCH_PADDING,
  OM_B64_BAD_PADDING,      /* padded, but the length is not a multiple of 4 */
  OM_B64_BAD_LENGTH,       /* standard base64 whose length is not a multiple of 4 */
  OM_B64_TRUNCATED,        /* one symbol left over: not even one byte */
  OM_B64_PADDING_INSIDE,   /* '=' before the end; *pos says where */
  OM_B64_BAD_CHAR,         /* not in the alphabet; *pos says where */
  OM_B64_STRAY_BITS        /* the last symbol's unused bits are not zero */
} om_b64_status;

/* Bytes om_b64_encode writes for n input bytes. */
OM_HIDDEN size_t om_b64_encoded_len(size_t n, int url);
OM_HIDDEN void om_b64_encode(const unsigned char *s, size_t n, int url, char *dst);

/* An upper bound of the decoded size, for sizing out before decoding. */
OM_HIDDEN size_t om_b64_decoded_max(size_t n);
/* Strict decoding: every byte string has exactly one accepted encoding.
 * On failure out may hold partial data (the caller wipes it) and *pos is the
 * 1-based position of the offending symbol, where there is one. */
OM_HIDDEN om_b64_status om_b64_decode(const char *s, size_t n, int url, unsigned char *out,
                                      size_t *outlen, size_t *pos);
/* Why decoding failed, for error messages (never the data: it may be secret). */
OM_HIDDEN const char *om_b64_reason(om_b64_status st);

#endif
