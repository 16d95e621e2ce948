// libFuzzer target: codec parameters and the JSON parser. Input = codec name, a NUL byte, then the
// params text. canonical_params must accept or throw std::invalid_argument; whatever it accepts must be
// canonical (canonicalising again gives the same text) and must round-trip through the JSON writer.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "deltapack/deltapack.h"
#include "json.h"

using namespace deltapack;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const char* p = reinterpret_cast<const char*>(data);
    const void* nul = std::memchr(p, 0, size);
    std::string codec = nul ? std::string(p, static_cast<const char*>(nul)) : "sign";
    std::string text = nul ? std::string(static_cast<const char*>(nul) + 1, p + size) : std::string(p, size);
    try {
        json::Value v = json::parse(text);
        std::string once = json::dump(v);
        if (json::dump(json::parse(once)) != once) {
            std::fprintf(stderr, "JSON does not round-trip: %s\n", once.c_str());
            std::abort();
        }
    } catch (const std::runtime_error&) {     // not JSON
    } catch (const std::invalid_argument&) {  // a number the writer cannot hold (1e999)
    }
    try {
        std::string canon = canonical_params(codec, text);
        if (canonical_params(codec, canon) != canon) {
            std::fprintf(stderr, "not canonical: %s\n", canon.c_str());
            std::abort();
        }
    } catch (const std::invalid_argument&) {
    }
    return 0;
}
