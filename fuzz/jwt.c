/* fuzz/jwt.c — libFuzzer target: crypto.jwt_decode (lua/oauthmail/crypto.lua
 * over the C base64url decoder and lua-cjson) on arbitrary tokens;
 * fuzz/jwt.lua states what must hold. */
#include "lua_harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!harness_L) harness_init(FUZZ_ROOT "/fuzz/jwt.lua");
  harness_run(data, size);
  return 0;
}
