// Wiping a read buffer's storage (Beast's flat_buffer, or anything with its
// size/consume/capacity/prepare): requests and answers pass through it with
// values in them. Header-only, so that common needs no Beast.
#pragma once

#include <openssl/crypto.h>

namespace custody {

// Wipes the whole storage once everything read has been consumed; leaves it
// alone while bytes (a pipelined request) still wait in it.
template <typename Buffer>
void WipeSpent(Buffer& b) {
  if (b.size() != 0) return;
  auto spare = b.prepare(b.capacity());  // with nothing held: the whole storage
  OPENSSL_cleanse(spare.data(), spare.size());
}

// Drops whatever is left and wipes all of it (the buffer's last use).
template <typename Buffer>
void WipeAll(Buffer& b) {
  b.consume(b.size());
  WipeSpent(b);
}

}  // namespace custody
