/* fuzz/smtp_engine.c — libFuzzer target: the SMTP engine (csrc/smtp*.c)
 * talking to a hostile server; fuzz/smtp_engine.lua plays the client. */
#include "lua_harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!harness_L) harness_init(FUZZ_ROOT "/fuzz/smtp_engine.lua");
  harness_run(data, size);
  return 0;
}
