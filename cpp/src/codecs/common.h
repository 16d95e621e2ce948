// Small helpers shared by the codec files.
#pragma once

#include <cmath>
#include <string>

#include "../codec.h"

namespace deltapack {

// Throws std::invalid_argument if the row holds NaN or infinity (deltas must be finite).
inline void check_finite(const float* x, int64_t n, int64_t row) {
    uint32_t bad = 0;
    for (int64_t j = 0; j < n; ++j) bad |= uint32_t((f32_to_bits(x[j]) & 0x7f800000u) == 0x7f800000u);
    if (bad) throw std::invalid_argument("delta row " + std::to_string(row) + " contains NaN or infinity");
}

// Stores v in a float dtype; a value that overflows f16 is an error, not a silent infinity.
inline void store_checked(void* p, DType t, size_t i, float v, const char* codec) {
    if (t == DType::F16 && std::fabs(v) > 65504.0f)
        throw std::invalid_argument(std::string(codec) + ": value " + std::to_string(v) +
                                    " overflows float16; use f32 or bf16");
    store_one(p, t, i, v);
}

inline const uint8_t* row_ptr(const ArrayRef& a, int64_t row, int64_t row_bytes) {
    return static_cast<const uint8_t*>(a.data) + size_t(row * row_bytes);
}

// Packs unsigned codes of `w` bits LSB-first into a zeroed row.
inline void pack_codes(const uint32_t* codes, int64_t n, int w, uint8_t* row) {
    for (int64_t j = 0; j < n; ++j) {
        size_t bit = size_t(j) * size_t(w);
        uint32_t v = codes[j] << (bit & 7);
        row[bit >> 3] |= uint8_t(v);
        if ((bit & 7) + size_t(w) > 8) row[(bit >> 3) + 1] |= uint8_t(v >> 8);
    }
}

}  // namespace deltapack
