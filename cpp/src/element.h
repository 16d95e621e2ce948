// Per-element math shared by the CPU engine and the CUDA kernels: float conversions and rounding (nearest and
// dithered), packed-code reads, and the f32 step of a rebuild. Every function is DP_HD: __host__ __device__ under
// nvcc, plain inline for the host compiler, so the scalar CPU path, the SIMD paths' tails, the CUDA kernels and
// their host emulation compute each element with the same code (bit-identical by construction). No FMA
// contraction anywhere: the CPU builds use -ffp-contract=off, nvcc --fmad=false.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#include "deltapack/deltapack.h"

#if defined(__CUDACC__)
#define DP_HD __host__ __device__ inline
#else
#define DP_HD inline
#endif

namespace deltapack {

// The largest |alpha * delta| a rebuild accepts: beyond it base + alpha * delta can overflow even f32/bf16, and
// no fine-tune moves a weight that far (a larger value means a damaged or hostile delta).
constexpr float kMaxStep = 0x1p126f;

DP_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}
DP_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}

DP_HD float abs_f32(float f) { return bits_to_f32(f32_to_bits(f) & 0x7fffffffu); }  // exact, either side
DP_HD bool is_finite_f32(float f) { return (f32_to_bits(f) & 0x7f800000u) != 0x7f800000u; }
// x * 2^e, exact (IEEE scaling; CUDA's ldexpf has 0 ulp error).
DP_HD float scale_by_pow2(float x, int e) {
#if defined(__CUDA_ARCH__)
    return ldexpf(x, e);
#else
    return std::ldexp(x, e);
#endif
}

DP_HD float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

DP_HD uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

DP_HD float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_to_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return bits_to_f32(sign);
        float v = float(m) * (1.0f / 16777216.0f);  // m * 2^-24, exact
        return sign ? -v : v;
    }
    return bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
}

DP_HD uint16_t f32_to_f16(float f) {
    uint32_t x = f32_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00u | ((ax >> 13) & 0x3ffu) : 0x7c00u));
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
    if (ax >= 0x38800000u) {                                  // normal half
        uint32_t v = ax - 0x38000000u;
        v += 0xfffu + ((v >> 13) & 1u);
        return uint16_t(sign | (v >> 13));
    }
    uint32_t e = ax >> 23;
    if (e < 102) return uint16_t(sign);  // below 2^-25: rounds to zero
    uint32_t m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
}

// Dithered rounding (docs/FORMAT.md §3): f32 -> f16/bf16 rounded away from zero with probability equal to the
// fraction of an output ulp that truncation drops, the "random" bits taken from a hash of the element's index, so
// the rounding is unbiased on average yet deterministic. A lossy delta smaller than half an ulp survives it on
// average, where rounding to nearest erases it.
DP_HD uint64_t mix64(uint64_t x) {  // SplitMix64's finalizer
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
// The 64 dither bits of a tensor's element `index` (flat, row-major): SplitMix64's output number index + 1 from
// seed 0. The same for every tensor, so a delta gives the same bits however it was named or stored.
DP_HD uint64_t dither_bits(uint64_t index) { return mix64((index + 1) * 0x9e3779b97f4a7c15ull); }

DP_HD uint16_t f32_to_bf16_dithered(float f, uint64_t h) {
    const uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) >= 0x7f800000u) return f32_to_bf16(f);  // inf, NaN: as nearest
    // Up (away from zero: the magnitude bits + 1) iff the 16 dropped bits exceed 16 random bits.
    return uint16_t((u >> 16) + ((u & 0xffffu) > (h >> 48) ? 1u : 0u));
}

DP_HD uint16_t f32_to_f16_dithered(float f, uint64_t h) {
    const uint32_t x = f32_to_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x47800000u) return f32_to_f16(f);   // >= 65536, inf, NaN: as nearest (infinity, NaN)
    if (ax >= 0x38800000u) {                        // normal half: 13 dropped bits
        const uint32_t v = ax - 0x38000000u;
        return uint16_t(sign | ((v >> 13) + ((v & 0x1fffu) > (h >> 51) ? 1u : 0u)));
    }
    const uint32_t e = ax >> 23;                    // subnormal half (or zero): m x 2^-shift in units of 2^-24
    if (e < 64) return uint16_t(sign);              // below 2^-63: zero (the chance of up is under 2^-39)
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - e;  // shift 14 .. 62
    const uint64_t rem = uint64_t(m) & ((uint64_t(1) << shift) - 1);
    return uint16_t(sign | ((uint64_t(m) >> shift) + (rem > (h >> (64 - shift)) ? 1u : 0u)));
}

DP_HD float load_one(const void* p, DType t, size_t i) {
    switch (t) {
        case DType::F32: return static_cast<const float*>(p)[i];
        case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
        default: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    }
}

// Sparse value i as f32: f32/f16/bf16 widen exactly; i8 is multiplied by its row's scale.
DP_HD float sparse_value(const void* p, DType t, size_t i, float vscale) {
    if (t == DType::I8) return float(static_cast<const int8_t*>(p)[i]) * vscale;
    return load_one(p, t, i);
}

DP_HD void store_one(void* p, DType t, size_t i, float v) {
    switch (t) {
        case DType::F32: static_cast<float*>(p)[i] = v; break;
        case DType::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
        default: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    }
}

DP_HD uint32_t read_code(const uint8_t* row, int w, size_t j) {
    size_t bit = j * size_t(w);
    uint32_t v = row[bit >> 3] >> (bit & 7);
    int have = 8 - int(bit & 7);
    if (have < w) v |= uint32_t(row[(bit >> 3) + 1]) << have;
    return v & ((1u << w) - 1u);
}

// The f32 value of one rebuilt element before its rounding: f32(base) + alpha * d, one product and one sum.
// ok becomes false when |alpha * d| is not at most kMaxStep (a NaN is not).
DP_HD float rebuild_sum(float base, float alpha, float d, bool& ok) {
    const float t = alpha * d;
    ok = ok && abs_f32(t) <= kMaxStep;
    return base + t;
}

// Sixteen lanes of a sum folded to one, lane i += lane i+8, +4, +2, +1 (the order of Kernels::dots in f32 and of
// Kernels::abs_sum in f64).
template <class T>
DP_HD T fold_16_lanes(T lanes[16]) {
    for (int half = 8; half >= 1; half /= 2)
        for (int i = 0; i < half; ++i) lanes[i] = lanes[i] + lanes[i + half];
    return lanes[0];
}

// The sum of x over the columns of group q (4q .. 4q + 3, fewer at the end of n) whose bits are set in m, added in
// column order to +0: an entry of a sign table (Kernels::sign_tables).
DP_HD float group_sum(const float* x, int64_t n, int64_t q, unsigned m) {
    float s = 0.0f;
    for (int64_t c = 0; c < 4 && 4 * q + c < n; ++c)
        if ((m >> c) & 1u) s = s + x[4 * q + c];
    return s;
}

// Bytes of `cols` codes `width` bits wide, packed LSB-first (a row of signs, codes, a mask).
DP_HD int64_t packed_row_bytes(int64_t cols, int width) { return (cols * width + 7) / 8; }

DP_HD bool bit_at(const uint8_t* bits, uint64_t j) { return (bits[j >> 3] >> (j & 7)) & 1u; }  // LSB-first

}  // namespace deltapack
