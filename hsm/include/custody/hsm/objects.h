// Object helpers over a session: search (C_FindObjects* with its Final always
// called), attribute reads, random bytes, and a printable object summary.
//
//   CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
//   CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}};
//   auto handles = hsm::FindObjects(session, t, 16);
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "custody/common/hex.h"
#include "custody/common/result.h"
#include "custody/hsm/session.h"

namespace custody::hsm {

Result<std::vector<CK_OBJECT_HANDLE>> FindObjects(Session& s, std::span<CK_ATTRIBUTE> tmpl,
                                                  size_t max_results);

Status GenerateRandom(Session& s, std::span<uint8_t> out);

Status DestroyObject(Session& s, CK_OBJECT_HANDLE h);

// What a token object is, as the token reports it. Sensitive values are never
// read: only public attributes.
struct ObjectSummary {
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  // Not CKR_OK when the token lists the object but cannot say what it is: a
  // SoftHSM2 object file cut short by a process killed while creating it,
  // say. Such an object has no class, label or id here.
  CK_RV problem = CKR_OK;
  bool readable() const { return problem == CKR_OK; }
  CK_OBJECT_CLASS object_class = 0;
  CK_KEY_TYPE key_type = 0;
  std::string label;
  std::vector<uint8_t> id;
  bool token = false, is_private = false;
  bool sensitive = false, extractable = false, always_sensitive = false, never_extractable = false;
  bool local = false;
  CK_ULONG value_len = 0;
};
Result<ObjectSummary> Describe(Session& s, CK_OBJECT_HANDLE h);

// Every object visible to the logged-in session. An object whose class,
// label or id cannot be read, or whose handle the token no longer accepts,
// is listed as unreadable (with its CK_RV) instead of failing the listing.
// Session and device errors still fail it.
Result<std::vector<ObjectSummary>> ListObjects(Session& s);

std::string ClassName(CK_OBJECT_CLASS c);
std::string KeyTypeName(CK_KEY_TYPE k);

}  // namespace custody::hsm
