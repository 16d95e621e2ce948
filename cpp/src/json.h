// A small strict JSON value, parser and writer: enough for safetensors headers and the manifest.
// Hand-written because the core must build with no system packages; it bounds depth and size and
// never trusts its input.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace deltapack::json {

struct Value {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool b = false;
    double num = 0;
    bool is_integer = false;  // the literal had no fraction or exponent
    int64_t integer = 0;      // valid when is_integer (and it fitted)
    std::string str;
    std::vector<Value> arr;
    std::vector<std::pair<std::string, Value>> obj;  // insertion order kept

    const Value* find(const std::string& key) const;
    Value& set(const std::string& key, Value v);  // replace or append
    static Value make_string(std::string s);
    static Value make_int(int64_t v);
    static Value make_number(double v);
    static Value make_object();
    static Value make_array();
};

// Throws std::runtime_error("...at byte N (in key.path)") on malformed input, duplicate keys, depth > 64, or more
// values than one per 8 bytes of text (plus 4096): memory stays proportional to the text's size.
Value parse(const std::string& text);
// Whether `text` is well-formed UTF-8 (what parse() requires of strings).
bool is_utf8(const std::string& text);
// Compact and deterministic (insertion order); indent > 0: one member per line, as Python's
// json.dumps(indent=...) lays it out (for files people read: index.json, config.json).
std::string dump(const Value& v, int indent = 0);

}  // namespace deltapack::json
