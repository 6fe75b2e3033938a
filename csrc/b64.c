/* b64.c — the base64 and base64url codec (RFC 4648) both the crypto family
 * and the SMTP engine use; strict on input so that a value has one spelling. */
#include "b64.h"

static const char ALPHABET[2][65] = {
  "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
  "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
};

size_t om_b64_encoded_len(size_t n, int url) {
  return url ? n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0) : (n + 2) / 3 * 4;
}

void om_b64_encode(const unsigned char *s, size_t n, int url, char *dst) {
  const char *a = ALPHABET[url ? 1 : 0];
  size_t i;
  for (i = 0; i + 2 < n; i += 3) {
    unsigned long v = ((unsigned long)s[i] << 16) | ((unsigned long)s[i + 1] << 8) | s[i + 2];
    *dst++ = a[(v >> 18) & 63];
    *dst++ = a[(v >> 12) & 63];
    *dst++ = a[(v >> 6) & 63];
    *dst++ = a[v & 63];
  }
  if (n - i == 1) {
    unsigned long v = (unsigned long)s[i] << 16;
    *dst++ = a[(v >> 18) & 63];
    *dst++ = a[(v >> 12) & 63];
    if (!url) { *dst++ = '='; *dst++ = '='; }
  } else if (n - i == 2) {
    unsigned long v = ((unsigned long)s[i] << 16) | ((unsigned long)s[i + 1] << 8);
    *dst++ = a[(v >> 18) & 63];
    *dst++ = a[(v >> 12) & 63];
    *dst++ = a[(v >> 6) & 63];
    if (!url) *dst++ = '=';
  }
}

static int value(unsigned char c, int url) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == (url ? '-' : '+')) return 62;
  if (c == (url ? '_' : '/')) return 63;
  return -1;
}

size_t om_b64_decoded_max(size_t n) {
  return n / 4 * 3 + 3;
}

om_b64_status om_b64_decode(const char *in, size_t n, int url, unsigned char *out,
                            size_t *outlen, size_t *pos) {
  const unsigned char *s = (const unsigned char *)in;
  size_t i, data_len = n, o = 0;
  unsigned long acc = 0;
  int bits = 0;
  *outlen = 0;
  *pos = 0;
  while (data_len > 0 && s[data_len - 1] == '=') data_len--;
  if (n - data_len > 2) return OM_B64_TOO_MUCH_PADDING;
  if (n != data_len && n % 4 != 0) return OM_B64_BAD_PADDING;
  if (!url && n % 4 != 0) return OM_B64_BAD_LENGTH;
  if (data_len % 4 == 1) return OM_B64_TRUNCATED;
  for (i = 0; i < data_len; i++) {
    int v = value(s[i], url);
    if (v < 0) {
      *pos = i + 1;
      return s[i] == '=' ? OM_B64_PADDING_INSIDE : OM_B64_BAD_CHAR;
    }
    acc = ((acc << 6) | (unsigned long)v) & 0xffffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (unsigned char)((acc >> bits) & 0xff);
    }
  }
  /* the bits past the last whole byte would allow a second spelling */
  if (bits > 0 && (acc & ((1ul << bits) - 1)) != 0) return OM_B64_STRAY_BITS;
  *outlen = o;
  return OM_B64_OK;
}

const char *om_b64_reason(om_b64_status st) {
  switch (st) {
  case OM_B64_OK: return "valid";
  case OM_B64_TOO_MUCH_PADDING: return "too much padding";
  case OM_B64_BAD_PADDING: return "bad padding";
  case OM_B64_BAD_LENGTH: return "length is not a multiple of 4";
  case OM_B64_TRUNCATED: return "truncated input";
  case OM_B64_PADDING_INSIDE: return "padding inside the data";
  case OM_B64_BAD_CHAR: return "unexpected character";
  case OM_B64_STRAY_BITS: return "non-zero bits after the last byte";
  }
  return "invalid";
}
