#include "json.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace deltapack::json {

const Value* Value::find(const std::string& key) const {
    for (auto& kv : obj)
        if (kv.first == key) return &kv.second;
    return nullptr;
}

Value& Value::set(const std::string& key, Value v) {
    for (auto& kv : obj)
        if (kv.first == key) return kv.second = std::move(v);
    obj.emplace_back(key, std::move(v));
    return obj.back().second;
}

Value Value::make_string(std::string s) { Value v; v.kind = String; v.str = std::move(s); return v; }
Value Value::make_int(int64_t i) {
    Value v; v.kind = Number; v.num = double(i); v.is_integer = true; v.integer = i; return v;
}
Value Value::make_number(double d) { Value v; v.kind = Number; v.num = d; return v; }
Value Value::make_object() { Value v; v.kind = Object; return v; }
Value Value::make_array() { Value v; v.kind = Array; return v; }

namespace {

struct Parser {
    static constexpr size_t kScanKeys = 32;
    static constexpr size_t kValuesFree = 4096, kBytesPerValue = 8;
    const std::string& s;
    size_t i = 0;
    size_t values = 0;

    void check_unique_keys(const Value& v) const {
        std::vector<const std::string*> keys;
        keys.reserve(v.obj.size());
        for (auto& kv : v.obj) keys.push_back(&kv.first);
        std::sort(keys.begin(), keys.end(), [](auto* a, auto* b) { return *a < *b; });
        for (size_t k = 1; k < keys.size(); ++k)
            if (*keys[k] == *keys[k - 1]) fail(("duplicate key \"" + *keys[k] + "\" in the object ending").c_str());
    }

    // Where the parser is (keys and array indices from the top), for messages: a wrong value deep in a manifest
    // is named by its field, e.g. metadata.checkpoint.ft_bytes.
    std::vector<std::pair<const std::string*, size_t>> path;

    [[noreturn]] void fail(const char* what) const {
        std::string where;
        for (auto& p : path) {
            if (!p.first) {
                where += "[" + std::to_string(p.second) + "]";
            } else if (!p.first->empty() && std::all_of(p.first->begin(), p.first->end(), [](unsigned char c) {
                           return std::isalnum(c) || c == '_';
                       })) {
                where += (where.empty() ? "" : ".") + *p.first;
            } else {
                where += "[" + dump(Value::make_string(*p.first)) + "]";
            }
        }
        throw std::runtime_error(std::string("invalid JSON: ") + what + " at byte " + std::to_string(i) +
                                 (where.empty() ? "" : " (in " + where + ")"));
    }
    void ws() { while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i; }
    bool eat(char c) { ws(); if (i < s.size() && s[i] == c) { ++i; return true; } return false; }
    void expect(char c) { if (!eat(c)) fail((std::string("expected '") + c + "'").c_str()); }

    void literal(const char* word) {
        for (const char* p = word; *p; ++p, ++i)
            if (i >= s.size() || s[i] != *p) fail("bad literal");
    }

    static void put_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) out += char(cp);
        else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
        else if (cp < 0x10000) {
            out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
        } else {
            out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F));
            out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
        }
    }

    uint32_t hex4() {
        if (i + 4 > s.size()) fail("short \\u escape");
        uint32_t v = 0;
        for (int k = 0; k < 4; ++k) {
            char c = s[i++];
            v <<= 4;
            if (c >= '0' && c <= '9') v |= uint32_t(c - '0');
            else if (c >= 'a' && c <= 'f') v |= uint32_t(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= uint32_t(c - 'A' + 10);
            else fail("bad \\u escape");
        }
        return v;
    }

    // Length of the well-formed UTF-8 sequence at s[k] (no overlongs, surrogates or code points past
    // U+10FFFF), or 0.
    size_t utf8_sequence(size_t k) const {
        const auto at = [&](size_t j) { return j < s.size() ? (unsigned char)s[j] : 0u; };
        const unsigned c = at(k);
        size_t n;
        unsigned lo = 0x80, hi = 0xBF;  // the range of the second byte
        if (c >= 0xC2 && c <= 0xDF) n = 2;
        else if (c >= 0xE0 && c <= 0xEF) { n = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
        else if (c >= 0xF0 && c <= 0xF4) { n = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
        else return 0;
        if (at(k + 1) < lo || at(k + 1) > hi) return 0;
        for (size_t j = 2; j < n; ++j)
            if (at(k + j) < 0x80 || at(k + j) > 0xBF) return 0;
        return n;
    }

    std::string string() {
        ws();
        if (i >= s.size() || s[i] != '"') fail("expected string");
        ++i;
        std::string out;
        while (true) {
            if (i >= s.size()) fail("unterminated string");
            unsigned char c = (unsigned char)s[i++];
            if (c == '"') return out;
            if (c < 0x20) fail("control character in string");
            if (c >= 0x80) {  // JSON text is UTF-8: a bad sequence is corruption, not a name to pass on
                const size_t n = utf8_sequence(i - 1);
                if (!n) { --i; fail("string is not valid UTF-8"); }
                out.append(s, i - 1, n);
                i += n - 1;
                continue;
            }
            if (c != '\\') { out += char(c); continue; }
            if (i >= s.size()) fail("unterminated escape");
            char e = s[i++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00) {
                        if (i + 2 > s.size() || s[i] != '\\' || s[i + 1] != 'u') fail("lone surrogate");
                        i += 2;
                        uint32_t lo = hex4();
                        if (lo < 0xDC00 || lo >= 0xE000) fail("bad surrogate pair");
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    } else if (cp >= 0xDC00 && cp < 0xE000) fail("lone surrogate");
                    put_utf8(out, cp);
                    break;
                }
                default: fail("bad escape");
            }
        }
    }

    Value number() {
        size_t start = i;
        bool integer = true;
        if (s[i] == '-') ++i;
        if (i >= s.size() || !isdigit((unsigned char)s[i])) fail("bad number");
        if (s[i] == '0') ++i; else while (i < s.size() && isdigit((unsigned char)s[i])) ++i;
        if (i < s.size() && s[i] == '.') {
            integer = false; ++i;
            if (i >= s.size() || !isdigit((unsigned char)s[i])) fail("bad number");
            while (i < s.size() && isdigit((unsigned char)s[i])) ++i;
        }
        if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
            integer = false; ++i;
            if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
            if (i >= s.size() || !isdigit((unsigned char)s[i])) fail("bad number");
            while (i < s.size() && isdigit((unsigned char)s[i])) ++i;
        }
        std::string lit = s.substr(start, i - start);
        Value v;
        v.kind = Value::Number;
        v.num = std::strtod(lit.c_str(), nullptr);
        if (!std::isfinite(v.num)) fail(("number " + lit.substr(0, 32) + " is out of range (beyond a double)").c_str());
        if (integer) {
            errno = 0;
            long long x = std::strtoll(lit.c_str(), nullptr, 10);
            if (errno == 0) { v.is_integer = true; v.integer = x; }
        }
        return v;
    }

    Value value(int depth) {
        if (depth > 64) fail("nesting too deep");
        // A parsed value takes about 100 bytes of memory; the text of a real header, manifest or config holds one
        // per 10 bytes or more. One per 8 at most bounds what a file of small values ([0,0,0,...]) costs.
        if (++values > kValuesFree + s.size() / kBytesPerValue)
            fail(("more values than " + std::to_string(s.size()) + " bytes of JSON may hold (at most one per " +
                  std::to_string(kBytesPerValue) + " bytes)").c_str());
        ws();
        if (i >= s.size()) fail("unexpected end");
        char c = s[i];
        Value v;
        if (c == '{') {
            ++i; v.kind = Value::Object;
            if (eat('}')) return v;
            do {
                std::string key = string();
                // Small objects: a scan names the key where it repeats; large ones are checked once, sorted
                // (a scan per key would make a header of many tensors quadratic to open).
                if (v.obj.size() < kScanKeys && v.find(key)) fail(("duplicate key \"" + key + "\"").c_str());
                expect(':');
                path.emplace_back(&key, 0);
                Value child = value(depth + 1);
                path.pop_back();
                v.obj.emplace_back(std::move(key), std::move(child));
            } while (eat(','));
            expect('}');
            if (v.obj.size() > kScanKeys) check_unique_keys(v);
        } else if (c == '[') {
            ++i; v.kind = Value::Array;
            if (eat(']')) return v;
            size_t n = 0;
            do {
                path.emplace_back(nullptr, n++);
                v.arr.push_back(value(depth + 1));
                path.pop_back();
            } while (eat(','));
            expect(']');
        } else if (c == '"') {
            v.kind = Value::String; v.str = string();
        } else if (c == 't') { literal("true"); v.kind = Value::Bool; v.b = true; }
        else if (c == 'f') { literal("false"); v.kind = Value::Bool; }
        else if (c == 'n') { literal("null"); }
        else v = number();
        return v;
    }
};

}  // namespace

bool is_utf8(const std::string& text) {
    const Parser p{text};
    for (size_t k = 0; k < text.size();) {
        if (static_cast<unsigned char>(text[k]) < 0x80) {
            ++k;
            continue;
        }
        const size_t n = p.utf8_sequence(k);
        if (!n) return false;
        k += n;
    }
    return true;
}

namespace {

void dump_string(std::string& out, const std::string& s) {
    out += '"';
    for (unsigned char c : s) {
        if (c == '"') out += "\\\"";
        else if (c == '\\') out += "\\\\";
        else if (c == '\n') out += "\\n";  // the short escapes, as Python's json writes them (kept text files
        else if (c == '\t') out += "\\t";  // are full of newlines: \u000a would cost four more bytes each)
        else if (c == '\r') out += "\\r";
        else if (c == '\b') out += "\\b";
        else if (c == '\f') out += "\\f";
        else if (c < 0x20) { char buf[8]; std::snprintf(buf, sizeof buf, "\\u%04x", c); out += buf; }
        else out += char(c);
    }
    out += '"';
}

void dump_to(std::string& out, const Value& v, int indent, size_t depth) {
    switch (v.kind) {
        case Value::Null: out += "null"; break;
        case Value::Bool: out += v.b ? "true" : "false"; break;
        case Value::Number: {
            if (v.is_integer) { out += std::to_string(v.integer); break; }
            if (!std::isfinite(v.num)) throw std::invalid_argument("JSON cannot hold a non-finite number");
            char buf[32];
            // Shortest of %.15g / %.16g / %.17g that reads back exactly (0.9, not 0.90000000000000002).
            for (int prec = 15; prec <= 17; ++prec) {
                std::snprintf(buf, sizeof buf, "%.*g", prec, v.num);
                if (std::strtod(buf, nullptr) == v.num) break;
            }
            std::string t = buf;
            if (t.find_first_of(".eE") == std::string::npos) t += ".0";
            out += t;
            break;
        }
        case Value::String: dump_string(out, v.str); break;
        case Value::Array:
        case Value::Object: {
            const bool obj = v.kind == Value::Object;
            const size_t n = obj ? v.obj.size() : v.arr.size();
            out += obj ? '{' : '[';
            for (size_t k = 0; k < n; ++k) {
                if (k) out += ',';
                if (indent) out += '\n' + std::string(size_t(indent) * (depth + 1), ' ');
                if (obj) {
                    dump_string(out, v.obj[k].first);
                    out += indent ? ": " : ":";
                }
                dump_to(out, obj ? v.obj[k].second : v.arr[k], indent, depth + 1);
            }
            if (indent && n) out += '\n' + std::string(size_t(indent) * depth, ' ');
            out += obj ? '}' : ']';
            break;
        }
    }
}

}  // namespace

Value parse(const std::string& text) {
    Parser p{text};
    Value v = p.value(0);
    p.ws();
    if (p.i != text.size()) p.fail("trailing characters");
    return v;
}

std::string dump(const Value& v, int indent) {
    std::string out;
    dump_to(out, v, indent, 0);
    return out;
}

}  // namespace deltapack::json
