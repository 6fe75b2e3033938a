/* fuzz/resp.c — libFuzzer target: the RESP engine (csrc/resp.c) reading a
 * hostile Redis server; fuzz/resp.lua states what must hold. */
#include "lua_harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!harness_L) harness_init(FUZZ_ROOT "/fuzz/resp.lua");
  harness_run(data, size);
  return 0;
}
