// InPlaceJson: the parser for bodies that carry a secret.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "custody/common/inplace_json.h"

namespace custody {
namespace {

TEST(InPlaceJson, ReadsStringsAndNumbersAsViewsIntoTheText) {
  std::string text = R"({"value": "sk-\"quoted\"\\back\u00e9\n", "version": 7, "other": [1, {"x": null}]})";
  const char* begin = text.data();
  auto j = InPlaceJson::Parse(text);
  ASSERT_TRUE(j.ok()) << j.error().message();
  auto v = j->String("value");
  ASSERT_TRUE(v);
  EXPECT_EQ(*v, "sk-\"quoted\"\\back\xc3\xa9\n");
  // The view lies inside the text: no copy was made.
  EXPECT_GE(v->data(), begin);
  EXPECT_LE(v->data() + v->size(), begin + text.size());
  EXPECT_EQ(j->Uint("version"), 7u);
  EXPECT_FALSE(j->String("version"));
  EXPECT_FALSE(j->Uint("value"));
  EXPECT_FALSE(j->String("missing"));
  EXPECT_TRUE(j->Has("other"));
  EXPECT_FALSE(j->Uint("other"));
}

TEST(InPlaceJson, RefusesWhatIsNotOneObject) {
  for (std::string bad : {std::string(""), std::string("[]"), std::string("\"value\""), std::string("{"),
                          std::string("{\"value\": \"x\"} trailing"), std::string("{\"value\": \"x\"}{}"),
                          std::string("{\"value\": \"x\0y\"}", 16), std::string("{\"value\": \"x\"}\0{}", 17),
                          std::string("{\"value\": \"\xff\"}"), std::string("{'value': 'x'}"),
                          std::string("{\"value\": \"a\", \"value\": \"b\"}"), std::string("{\"version\": -1, \"version\": 2}")}) {
    std::string copy = bad;
    auto j = InPlaceJson::Parse(copy);
    EXPECT_FALSE(j.ok()) << "accepted: " << nlohmann::json(bad).dump();
    if (!j.ok()) {
      EXPECT_EQ(j.error().category(), Category::kUsage);
    }
  }
}

TEST(InPlaceJson, DeepNestingAndLoneSurrogatesAreRefusedWithoutHarm) {
  std::string deep = "{\"a\":" + std::string(200000, '[') + std::string(200000, ']') + "}";
  auto j = InPlaceJson::Parse(deep);
  EXPECT_FALSE(j.ok()) << "nesting past 64 is refused";
  std::string unclosed = "{\"a\":" + std::string(200000, '[');
  EXPECT_FALSE(InPlaceJson::Parse(unclosed).ok());
  std::string lone = R"({"value": "a\udc00b"})";
  EXPECT_FALSE(InPlaceJson::Parse(lone).ok()) << "a lone low surrogate is not a character";
  std::string pair = R"({"value": "\ud83d\ude00"})";
  auto ok = InPlaceJson::Parse(pair);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok->String("value"), "\xf0\x9f\x98\x80");
  // A truncated multi-byte sequence at the very end (RapidJSON's own check
  // read past the end here).
  std::string cut = std::string("{\"value\": \"") + "\xf3";
  EXPECT_FALSE(InPlaceJson::Parse(cut).ok());
}

TEST(InPlaceJson, AgreesWithAGeneralParserOnWhatItAccepts) {
  // Valid bodies as clients send them, including every escape form.
  for (std::string good : {std::string(R"({"value":"plain"})"), std::string(R"({"value_base64":"c2stbGl2ZQ=="})"),
                           std::string(R"({ "value" : "tab\there \/ \b\f\r \ud83d\ude00" , "n": 1.5e3 })"),
                           std::string(R"({"value":""})"), std::string("{\"value\":\"caf\xc3\xa9\"}"),
                           std::string("\xEF\xBB\xBF{\"value\":\"after a byte order mark\"}")}) {
    auto expected = nlohmann::json::parse(good);
    std::string copy = good;
    auto j = InPlaceJson::Parse(copy);
    ASSERT_TRUE(j.ok()) << good << ": " << j.error().message();
    for (const char* key : {"value", "value_base64"}) {
      if (expected.contains(key)) {
        ASSERT_TRUE(j->String(key)) << good;
        EXPECT_EQ(*j->String(key), expected[key].get<std::string>()) << good;
      }
    }
  }
}

}  // namespace
}  // namespace custody
