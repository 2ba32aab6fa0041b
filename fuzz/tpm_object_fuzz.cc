// Fuzzes the decoder of TPM objects as the store keeps them ("CSTK" framing
// around the TSS-marshalled TPM2B_PUBLIC and TPM2B_PRIVATE): whatever the
// store returns, decoding must not crash or read out of bounds, and what it
// accepts must encode back to the same bytes.
#include <cstdint>
#include <cstdlib>
#include <span>

#include "custody/tpm/tpm.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto o = custody::tpm::SealedObject::Decode(std::span<const uint8_t>(data, size));
  if (!o.ok()) return 0;
  auto again = o->Encode();
  if (again.size() != size || !std::equal(again.begin(), again.end(), data)) std::abort();
  return 0;
}
