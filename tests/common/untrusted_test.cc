// Untrusted text on its way into records, labels and messages.
#include <gtest/gtest.h>

#include "custody/common/inplace_json.h"
#include "custody/common/untrusted.h"

namespace custody {
namespace {

TEST(Untrusted, PrintableTextIsUtf8WithoutControlCharacters) {
  EXPECT_TRUE(PrintableText(""));
  EXPECT_TRUE(PrintableText("payments/prod/stripe-key?version=2"));
  EXPECT_TRUE(PrintableText("Zürich \xe2\x82\xac \xf0\x9f\x94\x91"));  // ü, euro sign, a key emoji
  EXPECT_FALSE(PrintableText("\xff"));
  EXPECT_FALSE(PrintableText("a\nb"));
  EXPECT_FALSE(PrintableText(std::string("a\0b", 3)));
  EXPECT_FALSE(PrintableText("\x7f"));
  EXPECT_FALSE(PrintableText("\xc2\x85"));      // NEL, a C1 control
  EXPECT_FALSE(PrintableText("\xc0\xaf"));      // overlong '/'
  EXPECT_FALSE(PrintableText("\xed\xa0\x80"));  // a surrogate
  EXPECT_FALSE(PrintableText("\xe2\x82"));      // cut short
}

TEST(Untrusted, EscapeShowsEveryByteAndIsAlwaysPrintable) {
  EXPECT_EQ(EscapeUntrusted("web.internal"), "web.internal");
  EXPECT_EQ(EscapeUntrusted("web\xff\xfe.internal"), "web\\xff\\xfe.internal");
  EXPECT_EQ(EscapeUntrusted("a\\xff"), "a\\\\xff") << "a literal backslash is doubled: no two inputs look alike";
  EXPECT_EQ(EscapeUntrusted("line\nforged"), "line\\x0aforged");
  EXPECT_EQ(EscapeUntrusted("Zürich"), "Zürich");
  EXPECT_EQ(EscapeUntrusted("\xc2\x85"), "\\xc2\\x85");
  EXPECT_EQ(EscapeUntrusted(std::string(10, 'a'), 4), "aaaa...(10 bytes)");
  // A multi-byte character cut by the limit is shown as bytes.
  EXPECT_EQ(EscapeUntrusted("ab\xe2\x82\xac", 3), "ab\\xe2...(5 bytes)");
  for (int b = 0; b < 256; ++b) {
    std::string in(1, static_cast<char>(b));
    EXPECT_TRUE(PrintableText(EscapeUntrusted(in))) << b;
  }
}

TEST(Untrusted, ValidUtf8KeepsTextAndEscapesOnlyWhatIsNotUtf8) {
  EXPECT_EQ(ValidUtf8("plain \\ text\n"), "plain \\ text\n");
  EXPECT_EQ(ValidUtf8("x\xffy"), "x\\xffy");
  EXPECT_EQ(ValidUtf8("\xf4\x90\x80\x80"), "\\xf4\\x90\\x80\\x80");  // past U+10FFFF
  EXPECT_TRUE(WellFormedUtf8(ValidUtf8("\xc0\xaf\xed\xa0\x80\xff")));
}

}  // namespace
}  // namespace custody
