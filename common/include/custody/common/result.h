// Result<T>: a value or an Error. [[nodiscard]] so an ignored failure is a
// compile warning (an error in CI, where warnings are errors).
//
//   Result<Project> p = store.FindProject("payments");
//   if (!p) return p.error();
//   CUSTODY_ASSIGN_OR_RETURN(auto kek, keks.Find(id));
#pragma once

#include <cassert>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>

#include "custody/common/error.h"

namespace custody {

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { assert(ok()); return std::get<0>(v_); }
  const T& value() const& { assert(ok()); return std::get<0>(v_); }
  T&& value() && { assert(ok()); return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

  const Error& error() const& { assert(!ok()); return std::get<1>(v_); }
  Error&& error() && { assert(!ok()); return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

// Status: success or an Error, for operations with no value.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Error error) : e_(std::move(error)) {}  // NOLINT: implicit by design
  static Status Ok() { return {}; }

  bool ok() const { return !e_.has_value(); }
  explicit operator bool() const { return ok(); }
  const Error& error() const& { assert(!ok()); return *e_; }
  Error&& error() && { assert(!ok()); return std::move(*e_); }

 private:
  std::optional<Error> e_;
};

}  // namespace custody

#define CUSTODY_CONCAT_INNER(a, b) a##b
#define CUSTODY_CONCAT(a, b) CUSTODY_CONCAT_INNER(a, b)

// Returns the error of a Status or Result expression from the enclosing function.
#define CUSTODY_RETURN_IF_ERROR(expr)                   \
  do {                                                  \
    auto&& custody_status_ = (expr);                    \
    if (!custody_status_.ok()) return std::move(custody_status_).error(); \
  } while (0)

#define CUSTODY_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return std::move(tmp).error();       \
  lhs = std::move(tmp).value()

// Declares or assigns `lhs` from a Result, or returns its error.
#define CUSTODY_ASSIGN_OR_RETURN(lhs, expr) \
  CUSTODY_ASSIGN_OR_RETURN_IMPL(CUSTODY_CONCAT(custody_result_, __LINE__), lhs, expr)
