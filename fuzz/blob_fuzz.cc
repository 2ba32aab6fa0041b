// Fuzzes the sealed-blob parser and the AAD builder: whatever bytes the store
// returns, parsing must not crash, read out of bounds, or accept a blob whose
// parts do not add up.
#include <cstdint>
#include <cstdlib>
#include <span>

#include "custody/seal/blob.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace custody::core;
  std::span<const uint8_t> in(data, size);
  auto v = ParseBlob(in);
  if (!v.ok()) return 0;
  // An accepted blob's views must cover the input exactly.
  if (v->header_bytes.size() != kHeaderSize ||
      v->header_bytes.size() + v->ciphertext_and_tag.size() != size ||
      v->ciphertext_and_tag.size() < kTagSize) {
    std::abort();
  }
  // Re-encoding the parsed header must give back the same bytes.
  auto again = EncodeHeader(v->header);
  if (!std::equal(again.begin(), again.end(), v->header_bytes.begin())) std::abort();
  auto aad = ContextAad(v->header_bytes, {"p", "e", "n", 1});
  if (aad.size() < kHeaderSize) std::abort();
  return 0;
}
