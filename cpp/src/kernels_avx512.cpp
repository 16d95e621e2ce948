// AVX-512 (F, BW, VL) path. bf16 rounding is done with integer ops rather than VCVTNEPS2BF16,
// which flushes denormals and so would not match the reference bit for bit.
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

namespace deltapack::avx512 {

static inline __mmask16 tail_mask(size_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

static inline __m512 load16(const void* p, DType t, size_t i, __mmask16 m) {
    if (m == 0xffff) {  // plain loads where possible
        switch (t) {
            case DType::F32: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
            case DType::F16:
                return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
            default:
                return _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i))), 16));
        }
    }
    switch (t) {
        case DType::F32: return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
        case DType::F16:
            return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
        default: {
            __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        }
    }
}

static inline __m256i to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

static inline void store16(void* p, DType t, size_t i, __m512 v, __mmask16 m) {
    switch (t) {
        case DType::F32: _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v); break;
        case DType::F16:
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m,
                                     _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            break;
        default: _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, to_bf16(v)); break;
    }
}

template <DType T>
static void to_f32_t(const void* src, float* dst, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src, T, i, 0xffff));
    if (i < n) {  // masked loads and stores are slow on some cores: only for the tail
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(dst + i, m, load16(src, T, i, m));
    }
}

static void to_f32(const void* src, DType t, float* dst, size_t n) {
    switch (t) {
        case DType::F32: return to_f32_t<DType::F32>(src, dst, n);
        case DType::F16: return to_f32_t<DType::F16>(src, dst, n);
        default: return to_f32_t<DType::BF16>(src, dst, n);
    }
}

// VCVTNE2PS2BF16 rounds to nearest even like the reference but treats denormal inputs as zero,
// so it is used only on vectors without denormals (almost always); the rest take to_bf16. This file
// is compiled with -mavx512bf16 so everything inlines; the instruction runs only where kHasBf16.
static const bool kHasBf16 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));

static inline bool has_denormal(__m512 v) {
    __m512i a = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
    return _mm512_cmplt_epu32_mask(_mm512_sub_epi32(a, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fffff)) != 0;
}

static inline __m512i bf16_line_hw(__m512 v0, __m512 v1) {
    return (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
}

// 32 values -> one 64-byte line of f16 or bf16.
template <DType OT>
static inline __m512i pack_line(__m512 v0, __m512 v1) {
    if (OT == DType::F16)
        return _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)),
            _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), 1);
    if (kHasBf16 && !has_denormal(v0) && !has_denormal(v1)) return bf16_line_hw(v0, v1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16(v0)), to_bf16(v1), 1);
}

// The loop of add_round: out[i] = round_ot(base[i] + t[i]), t from delta(i, m) (16 lanes; m: the live ones).
template <DType BT, DType OT, class Delta>
static void round_sums(const void* base, void* out, size_t n, bool stream, Delta delta) {
    auto value = [&](size_t i, __mmask16 m) { return _mm512_add_ps(load16(base, BT, i, m), delta(i, m)); };
    constexpr size_t osz = OT == DType::F32 ? 4 : 2;
    size_t i = 0;
    const uintptr_t addr = reinterpret_cast<uintptr_t>(out);
    stream = stream && addr % osz == 0;
    if (stream) {  // plain stores up to a 64-byte boundary, then whole lines with streaming stores
        const size_t head = std::min(n, ((64 - addr % 64) % 64) / osz);
        for (; i < head; i += 16) {
            __mmask16 m = tail_mask(head - i);
            store16(out, OT, i, value(i, m), m);
        }
        i = head;
    }
    for (; i + 32 <= n; i += 32) {
        __m512 v0 = value(i, 0xffff), v1 = value(i + 16, 0xffff);
        if (OT == DType::F32) {
            float* o = static_cast<float*>(out) + i;
            if (stream) { _mm512_stream_ps(o, v0); _mm512_stream_ps(o + 16, v1); }
            else { _mm512_storeu_ps(o, v0); _mm512_storeu_ps(o + 16, v1); }
        } else {
            __m512i line = pack_line<OT>(v0, v1);
            auto* o = reinterpret_cast<__m512i*>(static_cast<uint16_t*>(out) + i);
            if (stream) _mm512_stream_si512(o, line); else _mm512_storeu_si512(o, line);
        }
    }
    for (; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        store16(out, OT, i, value(i, m), m);
    }
}

template <DType BT, DType OT, bool ALPHA_ONE>
static bool add_round_t(const void* base, const float* d, float alpha, void* out, size_t n, bool stream) {
    const __m512 a = _mm512_set1_ps(alpha), limit = _mm512_set1_ps(kMaxStep);
    __mmask16 bad = 0;
    round_sums<BT, OT>(base, out, n, stream, [&](size_t i, __mmask16 m) {
        __m512 dv = m == 0xffff ? _mm512_loadu_ps(d + i) : _mm512_maskz_loadu_ps(m, d + i);
        __m512 t = ALPHA_ONE ? dv : _mm512_mul_ps(a, dv);
        bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(t), limit, _CMP_NLE_UQ);  // out of range or NaN
        return t;
    });
    return bad == 0;
}

// Bits i .. i + 15 of an LSB-first bit row of n bits (those at or past n: whatever the last byte holds).
static inline __mmask16 sign_bits16(const uint8_t* bits, size_t i, size_t n) {
    const size_t b = i / 8, sh = i % 8;
    if (sh == 0 && i + 16 <= n) {
        uint16_t w;
        std::memcpy(&w, bits + b, 2);
        return __mmask16(w);
    }
    const size_t last = (std::min(n, i + 16) - 1) / 8;
    uint32_t w = 0;
    for (size_t k = b; k <= last; ++k) w |= uint32_t(bits[k]) << (8 * (k - b));
    return __mmask16(w >> sh);
}

template <DType BT, DType OT>
static void sign_add_round_t(const uint8_t* bits, float t, const void* base, void* out, size_t n, bool stream) {
    const __m512 pos = _mm512_set1_ps(t), neg = _mm512_set1_ps(-t);
    round_sums<BT, OT>(base, out, n, stream,
                       [&](size_t i, __mmask16) { return _mm512_mask_blend_ps(sign_bits16(bits, i, n), neg, pos); });
}

template <DType BT>
static void sign_add_round_b(const uint8_t* bits, float t, const void* base, void* out, DType ot, size_t n, bool st) {
    switch (ot) {
        case DType::F32: return sign_add_round_t<BT, DType::F32>(bits, t, base, out, n, st);
        case DType::F16: return sign_add_round_t<BT, DType::F16>(bits, t, base, out, n, st);
        default: return sign_add_round_t<BT, DType::BF16>(bits, t, base, out, n, st);
    }
}

static void sign_add_round(const uint8_t* bits, float t, const void* base, DType bt, void* out, DType ot, size_t n,
                           bool stream) {
    switch (bt) {
        case DType::F32: return sign_add_round_b<DType::F32>(bits, t, base, out, ot, n, stream);
        case DType::F16: return sign_add_round_b<DType::F16>(bits, t, base, out, ot, n, stream);
        default: return sign_add_round_b<DType::BF16>(bits, t, base, out, ot, n, stream);
    }
}

template <DType BT>
static bool add_round_b(const void* base, const float* d, float alpha, void* out, DType ot, size_t n, bool st) {
    switch (ot) {
        case DType::F32:
            return alpha == 1.0f ? add_round_t<BT, DType::F32, true>(base, d, alpha, out, n, st)
                                 : add_round_t<BT, DType::F32, false>(base, d, alpha, out, n, st);
        case DType::F16:
            return alpha == 1.0f ? add_round_t<BT, DType::F16, true>(base, d, alpha, out, n, st)
                                 : add_round_t<BT, DType::F16, false>(base, d, alpha, out, n, st);
        default:
            return alpha == 1.0f ? add_round_t<BT, DType::BF16, true>(base, d, alpha, out, n, st)
                                 : add_round_t<BT, DType::BF16, false>(base, d, alpha, out, n, st);
    }
}

static bool add_round(const void* base, DType bt, const float* d, float alpha, void* out, DType ot, size_t n,
                      bool stream) {
    switch (bt) {
        case DType::F32: return add_round_b<DType::F32>(base, d, alpha, out, ot, n, stream);
        case DType::F16: return add_round_b<DType::F16>(base, d, alpha, out, ot, n, stream);
        default: return add_round_b<DType::BF16>(base, d, alpha, out, ot, n, stream);
    }
}

static void sign_expand(const uint8_t* bits, size_t n, float s, float* dst) {
    const __m512 pos = _mm512_set1_ps(s), neg = _mm512_set1_ps(-s);
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        uint16_t m;
        std::memcpy(&m, bits + j / 8, 2);
        _mm512_storeu_ps(dst + j, _mm512_mask_blend_ps(__mmask16(m), neg, pos));
    }
    scalar::sign_expand(bits + j / 8, n - j, s, dst + j);
}

static void pack_signs(const float* x, size_t n, uint8_t* bits) {
    const __m512 zero = _mm512_setzero_ps();
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        uint16_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), zero, _CMP_GT_OQ);
        std::memcpy(bits + j / 8, &m, 2);
    }
    scalar::pack_signs(x + j, n - j, bits + j / 8);
}

static double abs_sum(const float* x, size_t n) {
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();  // lanes 0-7, 8-15
    for (size_t j = 0; j < n; j += 16) {
        __m512 v = _mm512_abs_ps(j + 16 <= n ? _mm512_loadu_ps(x + j) : _mm512_maskz_loadu_ps(tail_mask(n - j), x + j));
        lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
    __m512d s8 = _mm512_add_pd(lo, hi);
    __m256d s4 = _mm256_add_pd(_mm512_castpd512_pd256(s8), _mm512_extractf64x4_pd(s8, 1));
    __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
}

static void unpack_codes(const uint8_t* row, int w, size_t n, float offset, float scale, float* dst) {
    const __m512 off = _mm512_set1_ps(offset), sc = _mm512_set1_ps(scale);
    size_t j = 0;
    if (w == 8) {
        for (; j + 16 <= n; j += 16) {
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
            _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), off), sc));
        }
    } else if (w == 4) {
        const __m128i low4 = _mm_set1_epi8(0x0f);
        for (; j + 16 <= n; j += 16) {
            __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j / 2));
            __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
            __m512i c = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
            _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), off), sc));
        }
    } else if (w == 2) {
        const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        for (; j + 16 <= n; j += 16) {
            uint32_t word;
            std::memcpy(&word, row + j / 4, 4);
            __m512i c = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), shifts), _mm512_set1_epi32(3));
            _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), off), sc));
        }
    }
    // Other widths, and tails: j is a multiple of 16, so the bit position j*w is byte aligned.
    scalar::unpack_codes(row + j * size_t(w) / 8, w, n - j, offset, scale, dst + j);
}

// 16 codes of width w (1..8) starting at a byte boundary: two 8-code halves of w bytes each.
static inline __m512i codes16(const uint8_t* p, int w, __m512i shifts, __m512i mask) {
    uint64_t a, b;
    std::memcpy(&a, p, 8);
    std::memcpy(&b, p + w, 8);
    __m512i lo = _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64(int64_t(a)), shifts), mask);
    __m512i hi = _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64(int64_t(b)), shifts), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
}

static void levels_expand(const uint8_t* signs, const uint8_t* codes, int w, size_t n, const float* table,
                          float* dst) {
    alignas(64) float tab[32] = {0};
    std::memcpy(tab, table, sizeof(float) << (w < 5 ? w : 5));
    const __m512 t0 = _mm512_load_ps(tab), t1 = _mm512_load_ps(tab + 16);
    const __m512i shifts = _mm512_set_epi64(7 * w, 6 * w, 5 * w, 4 * w, 3 * w, 2 * w, w, 0);
    const __m512i mask = _mm512_set1_epi64((int64_t(1) << w) - 1), signbit = _mm512_set1_epi32(int(0x80000000u));
    const size_t code_bytes = (n * size_t(w) + 7) / 8;
    size_t j = 0;
    // Each step reads 8 bytes at offset j*w/8 + w: stay inside the packed row.
    for (; j + 16 <= n && (w == 0 || j * size_t(w) / 8 + size_t(w) + 8 <= code_bytes); j += 16) {
        __m512 v;
        if (w == 0) v = _mm512_set1_ps(tab[0]);
        else {
            __m512i c = codes16(codes + j * size_t(w) / 8, w, shifts, mask);
            v = w <= 4 ? _mm512_permutexvar_ps(c, t0)
                       : w == 5 ? _mm512_permutex2var_ps(t0, c, t1) : _mm512_i32gather_ps(c, table, 4);
        }
        uint16_t m;
        std::memcpy(&m, signs + j / 8, 2);
        __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), signbit));
        _mm512_storeu_ps(dst + j, _mm512_mask_blend_ps(__mmask16(m), neg, v));
    }
    scalar::levels_expand(signs + j / 8, codes + j * size_t(w) / 8, w, n - j, table, dst + j);
}

static void sparse_expand(const uint8_t* mask, const void* values, DType vt, float vscale, size_t n, float* dst) {
    const __m512 vs = _mm512_set1_ps(vscale);
    size_t j = 0, e = 0;
    for (; j + 16 <= n; j += 16) {
        uint16_t m;
        std::memcpy(&m, mask + j / 8, 2);
        const int c = __builtin_popcount(m);
        const __mmask16 lm = __mmask16((1u << c) - 1u);
        __m512 v;
        if (vt == DType::I8) {
            __m128i q = _mm_maskz_loadu_epi8(lm, static_cast<const int8_t*>(values) + e);
            v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), vs);
        } else {
            v = load16(values, vt, e, lm);
        }
        _mm512_storeu_ps(dst + j, _mm512_maskz_expand_ps(__mmask16(m), v));
        e += size_t(c);
    }
    for (; j < n; ++j) dst[j] = ((mask[j >> 3] >> (j & 7)) & 1) ? sparse_value(values, vt, e++, vscale) : 0.0f;
}

static uint64_t sum_bytes(const uint8_t* p, size_t n) {
    __m512i acc = _mm512_setzero_si512();
    size_t i = 0;
    for (; i + 64 <= n; i += 64) acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_loadu_si512(p + i), _mm512_setzero_si512()));
    uint64_t lanes[8], s = 0;
    _mm512_storeu_si512(lanes, acc);
    for (uint64_t v : lanes) s += v;
    return s + scalar::sum_bytes(p + i, n - i);
}

static uint64_t popcount_bytes(const uint8_t* p, size_t n) { return popcount_words(p, n, scalar::popcount_bytes); }

// Positions by a 16-lane prefix sum of (gap + 1), then one scatter per 16 values, relative to the column
// after the previous block: lanes hold offsets below 16 x 256, never a column, so rows wider than 2^31 work.
// +0 values (fillers) are masked out of the scatter. The row is zeroed with vector stores, not a memset
// call (GCC would make one): rep stosb leaves the lines where the following add pass reads them slowly.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) static void gaps_scatter(const uint8_t* gaps, const float* vals, size_t count, float* dst, size_t cols) {
    const __m512 zero = _mm512_setzero_ps();
    size_t j = 0;
    for (; j + 16 <= cols; j += 16) _mm512_storeu_ps(dst + j, zero);
    if (j < cols) _mm512_mask_storeu_ps(dst + j, tail_mask(cols - j), zero);
    const __m512i zi = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
    size_t next = 0, q = 0;  // the column after the previous entry
    for (; q + 16 <= count; q += 16) {
        __m512i g = _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gaps + q))), one);
        g = _mm512_add_epi32(g, _mm512_alignr_epi32(g, zi, 15));  // inclusive prefix sum over the lanes
        g = _mm512_add_epi32(g, _mm512_alignr_epi32(g, zi, 14));
        g = _mm512_add_epi32(g, _mm512_alignr_epi32(g, zi, 12));
        g = _mm512_add_epi32(g, _mm512_alignr_epi32(g, zi, 8));
        const __m512 v = _mm512_loadu_ps(vals + q);
        const __m512i vi = _mm512_castps_si512(v);
        _mm512_mask_i32scatter_ps(dst + next, _mm512_test_epi32_mask(vi, vi), _mm512_sub_epi32(g, one), v, 4);
        next += uint32_t(_mm_extract_epi32(_mm512_extracti32x4_epi32(g, 3), 3));
    }
    for (; q < count; ++q) {
        next += gaps[q];
        if (f32_to_bits(vals[q])) dst[next] = vals[q];
        ++next;
    }
}

static void scale(float* dst, size_t n, float s) {
    const __m512 v = _mm512_set1_ps(s);
    size_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_loadu_ps(dst + j), v));
    if (j < n) {
        __mmask16 m = tail_mask(n - j);
        _mm512_mask_storeu_ps(dst + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dst + j), v));
    }
}

// NR rows x 64 columns per step: 4*NR accumulators stay in registers while k runs.
template <int NR>
static void lowrank_block(const float* U, const float* V, int r, size_t cols, float* dst) {
    size_t j = 0;
    for (; j + 64 <= cols; j += 64) {
        __m512 acc[NR][4];
        for (int i = 0; i < NR; ++i)
            for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
        for (int k = 0; k < r; ++k) {
            const float* v = V + size_t(k) * cols + j;
            __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), v2 = _mm512_loadu_ps(v + 32),
                   v3 = _mm512_loadu_ps(v + 48);
            for (int i = 0; i < NR; ++i) {
                __m512 u = _mm512_set1_ps(U[size_t(i) * r + k]);
                acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_mul_ps(u, v0));
                acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_mul_ps(u, v1));
                acc[i][2] = _mm512_add_ps(acc[i][2], _mm512_mul_ps(u, v2));
                acc[i][3] = _mm512_add_ps(acc[i][3], _mm512_mul_ps(u, v3));
            }
        }
        for (int i = 0; i < NR; ++i)
            for (int q = 0; q < 4; ++q) _mm512_storeu_ps(dst + size_t(i) * cols + j + 16 * q, acc[i][q]);
    }
    for (; j < cols; j += 16) {
        __mmask16 m = tail_mask(cols - j);
        __m512 acc[NR];
        for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
        for (int k = 0; k < r; ++k) {
            __m512 v = _mm512_maskz_loadu_ps(m, V + size_t(k) * cols + j);
            for (int i = 0; i < NR; ++i)
                acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(_mm512_set1_ps(U[size_t(i) * r + k]), v));
        }
        for (int i = 0; i < NR; ++i) _mm512_mask_storeu_ps(dst + size_t(i) * cols + j, m, acc[i]);
    }
}

static void lowrank_rows(const float* U, const float* V, int r, size_t cols, int nr, float* dst) {
    int i = 0;
    for (; i + 4 <= nr; i += 4) lowrank_block<4>(U + size_t(i) * r, V, r, cols, dst + size_t(i) * cols);
    for (; i < nr; ++i) lowrank_block<1>(U + size_t(i) * r, V, r, cols, dst + size_t(i) * cols);
}

// Dots (mixed batches, decoded tiles): blocks of R rows x K batch rows, 16 lanes per sum; the tail and the
// fold are the scalar code's.
template <int R, int K>
static void block_dots(const float* a, size_t stride, const float* x, size_t ldx, size_t n, float* out, int nx) {
    __m512 acc[R][K];
    for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 xv[K];
        for (int b = 0; b < K; ++b) xv[b] = _mm512_loadu_ps(x + b * ldx + j);
        for (int i = 0; i < R; ++i) {
            const __m512 av = _mm512_loadu_ps(a + i * stride + j);
            for (int b = 0; b < K; ++b) acc[i][b] = _mm512_add_ps(acc[i][b], _mm512_mul_ps(av, xv[b]));
        }
    }
    for (int i = 0; i < R; ++i)
        for (int b = 0; b < K; ++b) {
            alignas(64) float lanes[16];
            _mm512_store_ps(lanes, acc[i][b]);
            out[i * nx + b] = scalar::dot_tail(lanes, a + i * stride, x + b * ldx, j, n);
        }
}

static void dots(const float* a, size_t as, int nrows, const float* x, size_t ldx, int nx, size_t n, float* out) {
    by_blocks<4, 4, 16>(nrows, nx, [&](auto r, auto k, int i, int b) {
        block_dots<r(), k()>(a + size_t(i) * as, as, x + size_t(b) * ldx, ldx, n, out + i * nx + b, nx);
    });
}

// A group's 16 entries are one register: lane m adds x_c where bit c of m is set (masked adds keep the other
// lanes), c = 0..3 in order from +0, as the scalar loop does.
static void sign_tables(const float* x, size_t ldx, int nx, size_t n, float* t) {
    static const __mmask16 with_column[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
    for (size_t q = 0; 4 * q < n; ++q)
        for (int b = 0; b < nx; ++b) {
            const float* xq = x + size_t(b) * ldx + 4 * q;
            const int have = int(std::min<size_t>(4, n - 4 * q));
            __m512 e = _mm512_setzero_ps();
            for (int c = 0; c < have; ++c) e = _mm512_mask_add_ps(e, with_column[c], e, _mm512_set1_ps(xq[c]));
            _mm512_storeu_ps(t + (q * size_t(nx) + size_t(b)) * 16, e);
        }
}

// 16 rows' 64-byte lines -> 16 registers, register w holding dword w of every row (lane l: row l): 32-bit and
// 64-bit interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles.
static inline void transpose_rows(__m512i v[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    __m512i u[16];  // u[4g + c], 128-bit lane i: rows 4g .. 4g + 3 of dword 4i + c
    for (int g = 0; g < 4; ++g) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512i x01 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i y01 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i x23 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
        const __m512i y23 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
        v[c] = _mm512_shuffle_i32x4(x01, y01, _MM_SHUFFLE(2, 0, 2, 0));
        v[4 + c] = _mm512_shuffle_i32x4(x01, y01, _MM_SHUFFLE(3, 1, 3, 1));
        v[8 + c] = _mm512_shuffle_i32x4(x23, y23, _MM_SHUFFLE(2, 0, 2, 0));
        v[12 + c] = _mm512_shuffle_i32x4(x23, y23, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

// Table sums with a row in each lane: R registers of 16 rows (the last `rows` may end early) x K batch rows.
// Each register holds 32 bits of each of its 16 rows; the lane's nibble of group q indexes that group's table
// register (vpermps reads the low 4 bits of each index), so one permute and one add serve 16 rows x 4 columns.
// The bits come a line per row at a time, transposed in registers (a gather per 32 bits took half the time);
// 32-bit gathers for the columns after the last whole 512, and the scalar code for those after the last 32.
template <int R, int K, bool SPANS>
__attribute__((noinline)) static void table_block(const uint8_t* bits, size_t stride, int rows, const float* t,
                                                  int nx, size_t n, size_t span_groups, float* done, float* out) {
    __m512 acc[R][K];
    for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
    TableSpans<16, R, K> spans(span_groups, done);
    const size_t ts = size_t(nx) * 16;
    // 32 columns of the R registers' rows: 8 groups
    auto add_step = [&](const __m512i* v, size_t s) {
        if constexpr (SPANS) {
            if (spans.starts_span(8 * s)) {
                float* to = spans.keep();
                for (int r = 0; r < R; ++r)
                    for (int b = 0; b < K; ++b) {
                        _mm512_storeu_ps(to + (r * K + b) * 16, acc[r][b]);
                        acc[r][b] = _mm512_setzero_ps();
                    }
            }
        }
        const float* tq = t + 8 * s * ts;
        for (int k = 0; k < 8; ++k, tq += ts)
            for (int r = 0; r < R; ++r) {
                const __m512i idx = _mm512_srli_epi32(v[r], unsigned(4 * k));
                for (int b = 0; b < K; ++b)
                    acc[r][b] = _mm512_add_ps(acc[r][b], _mm512_permutexvar_ps(idx, _mm512_loadu_ps(tq + 16 * b)));
            }
    };
    size_t s = 0;  // 32-column steps done
    for (; 32 * s + 512 <= n; s += 16) {
        alignas(64) __m512i lines[R][16];
        for (int r = 0; r < R; ++r) {
            for (int l = 0; l < 16; ++l) {
                const uint8_t* line = bits + size_t(16 * r + l) * stride + 4 * s;
                if (16 * r + l < rows) {
                    lines[r][l] = _mm512_loadu_si512(line);
                } else {
                    lines[r][l] = _mm512_setzero_si512();
                }
            }
            transpose_rows(lines[r]);
        }
        for (int w = 0; w < 16; ++w) {
            // 16 R rows are more streams than the hardware prefetchers follow: R rows at a time ask for their line
            // two ahead (one ahead left the bits of 8 fine-tunes x 4096^2 30 % slower to arrive after a matmul).
            for (int r = 0; r < R; ++r)
                if (16 * r + w < rows) {
                    const uint8_t* ahead = bits + size_t(16 * r + w) * stride + 4 * s + 128;
                    _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
                }
            __m512i v[R];
            for (int r = 0; r < R; ++r) v[r] = lines[r][w];
            add_step(v, s + size_t(w));
        }
    }
    const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(int(stride)));
    __mmask16 live[R];
    for (int r = 0; r < R; ++r) {
        const int left = rows - 16 * r;
        live[r] = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    }
    for (; 32 * s + 32 <= n; ++s) {
        __m512i v[R];
        for (int r = 0; r < R; ++r)
            v[r] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live[r], offsets,
                                               bits + size_t(16 * r) * stride + 4 * s, 1);
        add_step(v, s);
    }
    alignas(64) float running[R * K * 16];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < K; ++b) _mm512_store_ps(running + (r * K + b) * 16, acc[r][b]);
    spans.finish(running, bits, stride, rows, t, nx, n, 8 * s, out);
}

// Blocks of 64 rows x 4 batch rows (a table register loaded once serves 64 rows), then narrower ones.
static void table_sums(const uint8_t* bits, size_t bs, int nrows, const float* t, int nx, size_t n, size_t span_groups,
                       float* out) {
    // 32-bit gather offsets; spans that end inside a 32-column step (groups of 8 to 24 columns)
    if (bs > size_t(INT32_MAX / 16) || (span_groups % 8 && table_spans(n, span_groups) > 1))
        return scalar::table_sums(bits, bs, nrows, t, nx, n, span_groups, out);
    table_sums_by_blocks<16, 4, 4>(bits, bs, nrows, t, nx, n, span_groups, out,
        [&](auto r, auto k, auto spans, const uint8_t* rb, int rows, const float* tb, float* done, float* o) {
            table_block<r(), k(), spans()>(rb, bs, rows, tb, nx, n, span_groups, done, o);
        });
}

}  // namespace deltapack::avx512

namespace deltapack {
const Kernels kAvx512Kernels = {"avx512", avx512::to_f32, avx512::add_round, avx512::sign_expand, avx512::sign_add_round,
                                avx512::pack_signs, avx512::abs_sum, avx512::unpack_codes,
                                avx512::sparse_expand, avx512::levels_expand, avx512::gaps_scatter, avx512::sum_bytes, avx512::popcount_bytes, avx512::scale, avx512::lowrank_rows,
                                avx512::sign_tables, avx512::table_sums, avx512::dots};
}
