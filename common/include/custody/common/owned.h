// One owner for a C library's object: the library's free function as a
// unique_ptr deleter, so every OpenSSL (or TSS) handle is released on every
// path out.
//
//   using Pkey = custody::Owned<EVP_PKEY, EVP_PKEY_free>;
//   Pkey key(d2i_PUBKEY(nullptr, &p, n));
#pragma once

#include <memory>

namespace custody {

template <auto Free>
struct FreeWith {
  template <typename T>
  void operator()(T* p) const {
    Free(p);
  }
};

template <typename T, auto Free>
using Owned = std::unique_ptr<T, FreeWith<Free>>;

}  // namespace custody
