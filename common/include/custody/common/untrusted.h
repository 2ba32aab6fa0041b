// Bytes from outside (URL paths and queries, headers, certificate fields,
// user names, CLI arguments, the environment) on their way into a log line,
// an audit record, a metrics label or an error message.
//
// Each such path goes through here, so that no record writer ever meets
// bytes it cannot serialize (nlohmann's dump throws on bytes that are not
// UTF-8: one request once wedged custodyd's audit log that way) and no log
// line can be forged by a newline in a name.
//
//   if (!PrintableText(arg)) return Error(kUsage, "--reason is not printable UTF-8 text");
//   rc.identified_by = "tls san " + EscapeUntrusted(san);
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace custody {

// Length of the well-formed UTF-8 sequence starting at s[i] (1 to 4), or 0
// when the bytes there are not one (Unicode table 3-7).
size_t Utf8SequenceAt(std::string_view s, size_t i);

// Well-formed UTF-8 with no control character (C0, DEL, C1) at all: what a
// name, a reason or a query value may hold to be taken as it is.
bool PrintableText(std::string_view s);

// `s` as printable UTF-8 that says exactly which bytes came in: printable
// characters are kept, a backslash is doubled, and every other byte (control
// characters, bytes that are not UTF-8) is written as \xHH. Past `max_bytes`
// of input the rest is cut and "...(N bytes)" says how long it was.
// Reversible and never throws: fit for any record, label or message.
std::string EscapeUntrusted(std::string_view s, size_t max_bytes = 256);

// `s` unchanged when it is well-formed UTF-8, else with each byte that is
// not part of a well-formed sequence written as \xHH. The last line of
// defence of serializers (the audit record): text checked at the edge comes
// through unchanged; anything that slipped past is kept visible, not thrown on.
std::string ValidUtf8(std::string_view s);

}  // namespace custody
