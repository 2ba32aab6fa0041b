// Lower-case hex, written in one place: key ids, hashes, audit fields and
// KEK ids all use it, so the same bytes always print the same way.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace custody {

std::string ToHex(std::span<const uint8_t> bytes);

// SHA-256 of `text`, as 64 lower-case hex digits (policy hashes, audit
// record hashes).
std::string Sha256Hex(std::string_view text);

// Whether `s` is exactly `digits` lower-case hex digits.
bool IsLowerHex(std::string_view s, size_t digits);

// The bytes of hex text (either case); nullopt if it is not an even number
// of hex digits.
std::optional<std::vector<uint8_t>> FromHex(std::string_view hex);

}  // namespace custody
