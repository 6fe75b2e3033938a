/* crypto.c — the byte-level crypto the Lua layer composes: random bytes,
 * SHA-256/HMAC, strict base64, JWS signatures (RS256/PS256/ES256),
 * certificate thumbprints, AES-256-GCM sealing and scrypt.
 * Key material and plaintexts held in C buffers are wiped before release. */
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include "b64.h"
#include "core.h"

#define GCM_NONCE 12
#define GCM_TAG 16
#define MAX_RANDOM (1024 * 1024)
/* An RSA-16384 signature; EC P-256 DER signatures are at most 72 bytes. */
#define MAX_SIGNATURE 2048

/* Scratch memory owned by the Lua GC, so a raise (out of memory while pushing
 * a result) never leaks it; callers wipe it once the result is pushed. */
static unsigned char *scratch(lua_State *L, size_t n) {
  return (unsigned char *)lua_newuserdata(L, n ? n : 1);
}

static int crypto_random(lua_State *L) {
  lua_Integer n = luaL_checkinteger(L, 1);
  unsigned char *buf;
  luaL_argcheck(L, n >= 0 && n <= MAX_RANDOM, 1, "byte count out of range (0..1048576)");
  buf = scratch(L, (size_t)n);
  /* No usable randomness means no safe key, nonce or verifier: raise rather
   * than hand back something a caller could use by mistake. */
  if (n > 0 && RAND_bytes(buf, (int)n) != 1)
    return luaL_error(L, "crypto.random: the system random generator failed");
  lua_pushlstring(L, (const char *)buf, (size_t)n);
  OPENSSL_cleanse(buf, (size_t)n);
  return 1;
}

static int digest(lua_State *L, const EVP_MD *md, const unsigned char *s, size_t n) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(s, n, out, &len, md, NULL) != 1)
    return luaL_error(L, "digest failed");
  lua_pushlstring(L, (const char *)out, len);
  return 1;
}

static int crypto_sha256(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  return digest(L, EVP_sha256(), (const unsigned char *)s, n);
}

static int crypto_sha1(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  return digest(L, EVP_sha1(), (const unsigned char *)s, n);
}

static int crypto_hmac_sha256(lua_State *L) {
  size_t kn, n;
  const char *k = luaL_checklstring(L, 1, &kn);
  const char *s = luaL_checklstring(L, 2, &n);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  luaL_argcheck(L, kn <= INT_MAX, 1, "key too large");
  if (!HMAC(EVP_sha256(), k, (int)kn, (const unsigned char *)s, n, out, &len))
    return luaL_error(L, "hmac_sha256 failed");
  lua_pushlstring(L, (const char *)out, len);
  OPENSSL_cleanse(out, sizeof out);
  return 1;
}

static int crypto_hex(lua_State *L) {
  static const char digits[] = "0123456789abcdef";
  size_t n, i;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (i = 0; i < n; i++) {
    luaL_addchar(&b, digits[s[i] >> 4]);
    luaL_addchar(&b, digits[s[i] & 15]);
  }
  luaL_pushresult(&b);
  return 1;
}

/* ---- base64 (RFC 4648), strict: the codec is csrc/b64.c ---- */

static int b64_encode(lua_State *L, int url) {
  size_t n, el;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
  char *out;
  luaL_argcheck(L, n <= ((size_t)-1) / 2, 1, "data too large");
  el = om_b64_encoded_len(n, url);
  /* the input may be a secret (a SASL response, a key): so is its encoding */
  out = (char *)scratch(L, el);
  om_b64_encode(s, n, url, out);
  lua_pushlstring(L, out, el);
  OPENSSL_cleanse(out, el);
  return 1;
}

/* Padding is required for standard base64 and optional for base64url; the
 * unused low bits of the last symbol must be zero, so every byte string has
 * exactly one accepted encoding. Error messages give positions, never data
 * (the input may be a secret). */
static int b64_decode(lua_State *L, int url) {
  size_t n, out_max, out_len, pos;
  const char *s = luaL_checklstring(L, 1, &n);
  const char *name = url ? "base64url" : "base64";
  unsigned char *out;
  om_b64_status st;
  out_max = om_b64_decoded_max(n);
  out = scratch(L, out_max);
  st = om_b64_decode(s, n, url, out, &out_len, &pos);
  if (st != OM_B64_OK) {
    OPENSSL_cleanse(out, out_max);
    if (pos)
      return om_fail(L, "config", "decode", "invalid %s: %s at position %lu", name, om_b64_reason(st),
                     (unsigned long)pos);
    return om_fail(L, "config", "decode", "invalid %s: %s", name, om_b64_reason(st));
  }
  lua_pushlstring(L, (const char *)out, out_len);
  OPENSSL_cleanse(out, out_max);
  return 1;
}

static int crypto_b64encode(lua_State *L) { return b64_encode(L, OM_B64_STD); }
static int crypto_b64url_encode(lua_State *L) { return b64_encode(L, OM_B64_URL); }
static int crypto_b64decode(lua_State *L) { return b64_decode(L, 0); }
static int crypto_b64url_decode(lua_State *L) { return b64_decode(L, 1); }

/* ---- keys and signatures ---- */

struct pass {
  const char *s;
  size_t n;
  int asked;
};

/* Without a passphrase the callback refuses: OpenSSL's default would prompt on
 * the terminal, which a library must never do. */
static int pass_cb(char *buf, int size, int rwflag, void *u) {
  struct pass *p = (struct pass *)u;
  (void)rwflag;
  p->asked = 1;
  if (!p->s || p->n > (size_t)size) return -1;
  memcpy(buf, p->s, p->n);
  return (int)p->n;
}

static int is_encrypted_pem(const char *pem) {
  return strstr(pem, "ENCRYPTED") != NULL;
}

/* Load a private key from PEM text; on failure push nil, err and return NULL. */
static EVP_PKEY *load_key(lua_State *L, const char *pem, size_t n, const char *pass, size_t passn) {
  struct pass p;
  EVP_PKEY *pkey;
  BIO *bio = BIO_new_mem_buf(pem, (int)n);
  if (!bio) {
    luaL_error(L, "out of memory");
    return NULL;
  }
  p.s = pass;
  p.n = passn;
  p.asked = 0;
  pkey = PEM_read_bio_PrivateKey(bio, NULL, pass_cb, &p);
  BIO_free(bio);
  ERR_clear_error();
  if (pkey) return pkey;
  if (is_encrypted_pem(pem) || p.asked) {
    if (!pass) om_fail(L, "config", "passphrase", "the private key is encrypted: a passphrase is required");
    else om_fail(L, "config", "passphrase", "cannot decrypt the private key: wrong passphrase");
  } else if (!strstr(pem, "-----BEGIN")) {
    om_fail(L, "config", "key", "the key is not PEM text (expected -----BEGIN PRIVATE KEY-----; pass the file's contents, not its path)");
  } else {
    om_fail(L, "config", "key", "cannot read the private key (not a PEM private key, or damaged)");
  }
  return NULL;
}

static int key_is_p256(EVP_PKEY *pkey) {
  char group[64];
  size_t len = 0;
  if (!EVP_PKEY_is_a(pkey, "EC")) return 0;
  if (!EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &len))
    return 0;
  return strcmp(group, "prime256v1") == 0 || strcmp(group, "P-256") == 0;
}

/* ECDSA produces DER; JWS wants the fixed-width R||S form (RFC 7518 3.4). */
static int der_to_raw(const unsigned char *der, size_t derlen, unsigned char raw[64]) {
  const unsigned char *p = der;
  const BIGNUM *r, *s;
  int ok;
  ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)derlen);
  if (!sig) return 0;
  ECDSA_SIG_get0(sig, &r, &s);
  ok = BN_bn2binpad(r, raw, 32) == 32 && BN_bn2binpad(s, raw + 32, 32) == 32;
  ECDSA_SIG_free(sig);
  return ok;
}

static int crypto_sign(lua_State *L) {
  static const char *const algs[] = { "RS256", "PS256", "ES256", NULL };
  int alg = luaL_checkoption(L, 1, NULL, algs);
  size_t keyn, inn, passn = 0, siglen = 0;
  const char *key = luaL_checklstring(L, 2, &keyn);
  const char *in = luaL_checklstring(L, 3, &inn);
  const char *pass = luaL_optlstring(L, 4, NULL, &passn);
  EVP_PKEY *pkey;
  EVP_MD_CTX *md = NULL;
  EVP_PKEY_CTX *pctx = NULL;
  unsigned char *sig = NULL;
  int ok = 0;

  /* Allocated before any OpenSSL object: a raise (out of memory) here
   * leaks nothing, while one after load_key would leak the key. */
  sig = scratch(L, MAX_SIGNATURE);
  luaL_argcheck(L, keyn <= INT_MAX, 2, "key too large");
  pkey = load_key(L, key, keyn, pass, passn);
  if (!pkey) return 2;
  if (alg == 2 ? !key_is_p256(pkey) : !(EVP_PKEY_is_a(pkey, "RSA") || (alg == 1 && EVP_PKEY_is_a(pkey, "RSA-PSS")))) {
    const char *have = EVP_PKEY_is_a(pkey, "RSA") ? "an RSA key"
                     : EVP_PKEY_is_a(pkey, "EC") ? "an EC key (not on curve P-256)" : "an unsupported key type";
    EVP_PKEY_free(pkey);
    return om_fail(L, "config", "key", "%s needs %s, but the key is %s", algs[alg],
                   alg == 2 ? "an EC P-256 key" : "an RSA key", have);
  }
  md = EVP_MD_CTX_new();
  if (md && EVP_DigestSignInit(md, &pctx, EVP_sha256(), NULL, pkey) == 1) {
    ok = 1;
    if (alg == 1)
      ok = EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) > 0 &&
           EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 32) > 0 &&
           EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha256()) > 0;
    ok = ok && EVP_DigestSign(md, NULL, &siglen, (const unsigned char *)in, inn) == 1 && siglen <= MAX_SIGNATURE;
    ok = ok && EVP_DigestSign(md, sig, &siglen, (const unsigned char *)in, inn) == 1;
  }
  EVP_MD_CTX_free(md);
  EVP_PKEY_free(pkey);
  ERR_clear_error();
  if (!ok) return om_fail(L, "config", "key", "%s signing failed (unusable key)", algs[alg]);
  if (alg == 2) {
    unsigned char raw[64];
    if (!der_to_raw(sig, siglen, raw))
      return om_fail(L, "config", "key", "ES256 signing produced an unexpected signature");
    lua_pushlstring(L, (const char *)raw, sizeof raw);
  } else {
    lua_pushlstring(L, (const char *)sig, siglen);
  }
  return 1;
}

/* ---- certificates ---- */

static int crypto_thumbprint(lua_State *L) {
  static const char *const algs[] = { "sha1", "sha256", NULL };
  size_t n;
  const char *pem = luaL_checklstring(L, 1, &n);
  int alg = luaL_checkoption(L, 2, "sha256", algs);
  unsigned char *der = NULL;
  int derlen;
  X509 *x;
  BIO *bio;
  luaL_argcheck(L, n <= INT_MAX, 1, "certificate text too large");
  bio = BIO_new_mem_buf(pem, (int)n);
  if (!bio) return luaL_error(L, "out of memory");
  x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
  BIO_free(bio);
  ERR_clear_error();
  if (!x) return om_fail(L, "config", "cert", "cannot read the certificate (expected PEM text: -----BEGIN CERTIFICATE-----)");
  derlen = i2d_X509(x, &der);
  X509_free(x);
  if (derlen <= 0) return om_fail(L, "config", "cert", "cannot encode the certificate");
  lua_pushlstring(L, (const char *)der, (size_t)derlen);
  OPENSSL_free(der);
  return digest(L, alg == 0 ? EVP_sha1() : EVP_sha256(),
                (const unsigned char *)lua_tostring(L, -1), (size_t)derlen);
}

/* ---- AES-256-GCM ---- */

static const unsigned char *check_key32(lua_State *L, int arg) {
  size_t n;
  const char *k = luaL_checklstring(L, arg, &n);
  luaL_argcheck(L, n == 32, arg, "key must be 32 bytes");
  return (const unsigned char *)k;
}

static int gcm_seal(lua_State *L, const unsigned char *key, const unsigned char *nonce,
                    const char *pt, size_t ptn, const char *aad, size_t aadn) {
  size_t total = GCM_NONCE + ptn + GCM_TAG;
  unsigned char *out = scratch(L, total);
  EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
  int len = 0, ok;
  memcpy(out, nonce, GCM_NONCE);
  ok = c && EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
       EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, GCM_NONCE, NULL) == 1 &&
       EVP_EncryptInit_ex(c, NULL, NULL, key, nonce) == 1 &&
       (aadn == 0 || EVP_EncryptUpdate(c, NULL, &len, (const unsigned char *)aad, (int)aadn) == 1) &&
       (ptn == 0 || EVP_EncryptUpdate(c, out + GCM_NONCE, &len, (const unsigned char *)pt, (int)ptn) == 1) &&
       EVP_EncryptFinal_ex(c, out + GCM_NONCE + ptn, &len) == 1 &&
       EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, GCM_TAG, out + GCM_NONCE + ptn) == 1;
  EVP_CIPHER_CTX_free(c);  /* also wipes the expanded key schedule */
  if (!ok) return luaL_error(L, "aead_seal: encryption failed");
  lua_pushlstring(L, (const char *)out, total);
  return 1;
}

static int crypto_aead_seal(lua_State *L) {
  size_t ptn, aadn = 0;
  const unsigned char *key = check_key32(L, 1);
  const char *pt = luaL_checklstring(L, 2, &ptn);
  const char *aad = luaL_optlstring(L, 3, "", &aadn);
  unsigned char nonce[GCM_NONCE];
  /* OpenSSL takes int lengths: a bigger one would be cut, not refused. */
  luaL_argcheck(L, ptn < INT_MAX - GCM_NONCE - GCM_TAG, 2, "plaintext too large");
  luaL_argcheck(L, aadn <= INT_MAX, 3, "additional data too large");
  if (RAND_bytes(nonce, sizeof nonce) != 1)
    return luaL_error(L, "aead_seal: the system random generator failed");
  return gcm_seal(L, key, nonce, pt, ptn, aad, aadn);
}

#ifdef OAUTHMAIL_TESTING
/* Test builds only: a fixed nonce makes known-answer vectors checkable.
 * Reusing a nonce with the same key breaks GCM, so a production module has
 * no way to do it. */
static int crypto_gcm_seal_with_nonce(lua_State *L) {
  size_t ptn, aadn = 0, nn;
  const unsigned char *key = check_key32(L, 1);
  const char *nonce = luaL_checklstring(L, 2, &nn);
  const char *pt = luaL_checklstring(L, 3, &ptn);
  const char *aad = luaL_optlstring(L, 4, "", &aadn);
  luaL_argcheck(L, nn == GCM_NONCE, 2, "nonce must be 12 bytes");
  luaL_argcheck(L, ptn < INT_MAX - GCM_NONCE - GCM_TAG, 3, "plaintext too large");
  luaL_argcheck(L, aadn <= INT_MAX, 4, "additional data too large");
  return gcm_seal(L, key, (const unsigned char *)nonce, pt, ptn, aad, aadn);
}
#endif

static int crypto_aead_open(lua_State *L) {
  size_t n, aadn = 0, ptn;
  const unsigned char *key = check_key32(L, 1);
  const unsigned char *blob = (const unsigned char *)luaL_checklstring(L, 2, &n);
  const char *aad = luaL_optlstring(L, 3, "", &aadn);
  unsigned char *pt;
  EVP_CIPHER_CTX *c;
  int len = 0, ok;
  if (n < GCM_NONCE + GCM_TAG)
    return om_fail(L, "config", "auth_failed", "decryption failed: the data is too short to be sealed data");
  ptn = n - GCM_NONCE - GCM_TAG;
  luaL_argcheck(L, ptn <= INT_MAX, 2, "sealed data too large");
  luaL_argcheck(L, aadn <= INT_MAX, 3, "additional data too large");
  pt = scratch(L, ptn);
  c = EVP_CIPHER_CTX_new();
  ok = c && EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
       EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, GCM_NONCE, NULL) == 1 &&
       EVP_DecryptInit_ex(c, NULL, NULL, key, blob) == 1 &&
       (aadn == 0 || EVP_DecryptUpdate(c, NULL, &len, (const unsigned char *)aad, (int)aadn) == 1) &&
       (ptn == 0 || EVP_DecryptUpdate(c, pt, &len, blob + GCM_NONCE, (int)ptn) == 1) &&
       EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, GCM_TAG, (void *)(blob + GCM_NONCE + ptn)) == 1 &&
       EVP_DecryptFinal_ex(c, pt + ptn, &len) == 1;
  EVP_CIPHER_CTX_free(c);
  ERR_clear_error();
  if (!ok) {
    OPENSSL_cleanse(pt, ptn);
    return om_fail(L, "config", "auth_failed", "decryption failed: wrong key or data was modified");
  }
  lua_pushlstring(L, (const char *)pt, ptn);
  OPENSSL_cleanse(pt, ptn);
  return 1;
}

/* ---- scrypt (RFC 7914) ---- */

static int crypto_scrypt(lua_State *L) {
  size_t pn, sn;
  const char *pass = luaL_checklstring(L, 1, &pn);
  const char *salt = luaL_checklstring(L, 2, &sn);
  lua_Integer N = luaL_optinteger(L, 3, 32768);
  lua_Integer r = luaL_optinteger(L, 4, 8);
  lua_Integer p = luaL_optinteger(L, 5, 1);
  lua_Integer len = luaL_optinteger(L, 6, 32);
  double need;
  uint64_t maxmem;
  unsigned char *out;
  luaL_argcheck(L, N > 1 && (N & (N - 1)) == 0 && N <= (1 << 24), 3, "N must be a power of two, 2..2^24");
  luaL_argcheck(L, r >= 1 && r <= 64, 4, "r must be 1..64");
  luaL_argcheck(L, p >= 1 && p <= 64, 5, "p must be 1..64");
  luaL_argcheck(L, len >= 1 && len <= 1024, 6, "length must be 1..1024");
  /* The work area is 128*r*(N+p) bytes plus slack; allow exactly that so the
   * OpenSSL default (32 MiB) does not reject the recommended N=2^15, r=8. */
  need = 128.0 * (double)r * ((double)N + (double)p + 2.0) + 65536.0;
  if (need > 2147483648.0)
    return luaL_error(L, "scrypt parameters need more than 2 GiB of memory");
  maxmem = (uint64_t)need;
  out = scratch(L, (size_t)len);
  if (EVP_PBE_scrypt(pass, pn, (const unsigned char *)salt, sn, (uint64_t)N, (uint64_t)r,
                     (uint64_t)p, maxmem, out, (size_t)len) != 1) {
    ERR_clear_error();
    return om_fail(L, "config", "scrypt", "scrypt failed (not enough memory for N=%ld, r=%ld, p=%ld?)",
                   (long)N, (long)r, (long)p);
  }
  lua_pushlstring(L, (const char *)out, (size_t)len);
  OPENSSL_cleanse(out, (size_t)len);
  return 1;
}

static const luaL_Reg crypto_funcs[] = {
  { "random", crypto_random },
  { "sha256", crypto_sha256 },
  { "sha1", crypto_sha1 },
  { "hmac_sha256", crypto_hmac_sha256 },
  { "hex", crypto_hex },
  { "b64encode", crypto_b64encode },
  { "b64decode", crypto_b64decode },
  { "b64url_encode", crypto_b64url_encode },
  { "b64url_decode", crypto_b64url_decode },
  { "sign", crypto_sign },
  { "thumbprint", crypto_thumbprint },
  { "aead_seal", crypto_aead_seal },
  { "aead_open", crypto_aead_open },
#ifdef OAUTHMAIL_TESTING
  { "_gcm_seal_with_nonce", crypto_gcm_seal_with_nonce },
#endif
  { "scrypt", crypto_scrypt },
  { NULL, NULL }
};

void om_crypto_open(lua_State *L) {
  om_setfuncs(L, crypto_funcs);
}
