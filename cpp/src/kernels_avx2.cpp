// AVX2 + F16C path (8 lanes). Tails go to the scalar code, which computes the same bits.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace deltapack::avx2 {

static inline __m256 load8(const void* p, DType t, size_t i) {
    switch (t) {
        case DType::F32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
        case DType::F16:
            return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
        default: {
            __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
    }
}

static inline __m128i to_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    // NaN: |u| > 0x7f800000 (as signed ints this is safe: |u| < 2^31).
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, q, nan);
    __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit half: r0-3 r0-3 | r4-7 r4-7
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

static inline void store8(void* p, DType t, size_t i, __m256 v) {
    switch (t) {
        case DType::F32: _mm256_storeu_ps(static_cast<float*>(p) + i, v); break;
        case DType::F16:
            _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                             _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            break;
        default: _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), to_bf16(v)); break;
    }
}

static void to_f32(const void* src, DType t, float* dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src, t, i));
    for (; i < n; ++i) dst[i] = load_one(src, t, i);
}

template <DType BT, DType OT>
static bool add_round_t(const void* base, const float* d, float alpha, void* out, size_t n, bool stream) {
    const __m256 a = _mm256_set1_ps(alpha), limit = _mm256_set1_ps(kMaxStep);
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 bad = _mm256_setzero_ps();
    bool ok = true;
    auto step = [&](size_t i) {  // alpha * d, and whether it is out of range (unordered: NaN too)
        __m256 t = _mm256_mul_ps(a, _mm256_loadu_ps(d + i));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(t, abs), limit, _CMP_NLE_UQ));
        return t;
    };
    auto one = [&](size_t i) {
        float t = alpha * d[i];
        ok &= std::fabs(t) <= kMaxStep;
        store_one(out, OT, i, load_one(base, BT, i) + t);
    };
    constexpr size_t osz = OT == DType::F32 ? 4 : 2;
    size_t i = 0;
    const uintptr_t addr = reinterpret_cast<uintptr_t>(out);
    if (stream && addr % osz == 0) {
        // Plain stores up to a 32-byte boundary, then streaming stores.
        const size_t head = std::min(n, ((32 - addr % 32) % 32) / osz);
        for (; i < head; ++i) one(i);
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_add_ps(load8(base, BT, i), step(i));
            if (OT == DType::F32) {
                _mm256_stream_ps(static_cast<float*>(out) + i, v);
            } else {
                __m128i h = OT == DType::F16 ? _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                             : to_bf16(v);
                if ((addr + i * osz) % 16 == 0) _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), h);
                else _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), h);
            }
        }
    }
    for (; i + 8 <= n; i += 8) store8(out, OT, i, _mm256_add_ps(load8(base, BT, i), step(i)));
    for (; i < n; ++i) one(i);
    return ok && _mm256_movemask_ps(bad) == 0;
}

template <DType BT>
static bool add_round_b(const void* base, const float* d, float alpha, void* out, DType ot, size_t n, bool st) {
    switch (ot) {
        case DType::F32: return add_round_t<BT, DType::F32>(base, d, alpha, out, n, st);
        case DType::F16: return add_round_t<BT, DType::F16>(base, d, alpha, out, n, st);
        default: return add_round_t<BT, DType::BF16>(base, d, alpha, out, n, st);
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
    const __m256 pos = _mm256_set1_ps(s), neg = _mm256_set1_ps(-s);
    const __m256i sel = _mm256_set_epi32(128, 64, 32, 16, 8, 4, 2, 1);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256i b = _mm256_and_si256(_mm256_set1_epi32(bits[j / 8]), sel);
        __m256 m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, sel));
        _mm256_storeu_ps(dst + j, _mm256_blendv_ps(neg, pos, m));
    }
    scalar::sign_expand(bits + j / 8, n - j, s, dst + j);
}

static void pack_signs(const float* x, size_t n, uint8_t* bits) {
    const __m256 zero = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        bits[j / 8] = uint8_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), zero, _CMP_GT_OQ)));
    scalar::pack_signs(x + j, n - j, bits + j / 8);
}

static double abs_sum(const float* x, size_t n) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256d l0 = _mm256_setzero_pd(), l4 = l0, l8 = l0, l12 = l0;  // lanes 0-3, 4-7, 8-11, 12-15
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + j), absmask);
        __m256 b = _mm256_and_ps(_mm256_loadu_ps(x + j + 8), absmask);
        l0 = _mm256_add_pd(l0, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
        l4 = _mm256_add_pd(l4, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
        l8 = _mm256_add_pd(l8, _mm256_cvtps_pd(_mm256_castps256_ps128(b)));
        l12 = _mm256_add_pd(l12, _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)));
    }
    double lanes[16];
    _mm256_storeu_pd(lanes, l0);
    _mm256_storeu_pd(lanes + 4, l4);
    _mm256_storeu_pd(lanes + 8, l8);
    _mm256_storeu_pd(lanes + 12, l12);
    for (size_t k = 0; j + k < n; ++k) lanes[k] += double(x[j + k] < 0 ? -x[j + k] : x[j + k]);
    scalar::fold_lanes(lanes);
    return lanes[0];
}

static void unpack_codes(const uint8_t* row, int w, size_t n, float offset, float scale, float* dst) {
    const __m256 off = _mm256_set1_ps(offset), sc = _mm256_set1_ps(scale);
    size_t j = 0;
    if (w == 8) {
        for (; j + 8 <= n; j += 8) {
            __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
            _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), off), sc));
        }
    } else if (w == 4) {
        const __m256i shifts = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
        for (; j + 8 <= n; j += 8) {
            uint32_t word;
            std::memcpy(&word, row + j / 2, 4);
            __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shifts), _mm256_set1_epi32(15));
            _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), off), sc));
        }
    } else if (w == 2) {
        const __m256i shifts = _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0);
        for (; j + 8 <= n; j += 8) {
            uint32_t word = uint32_t(row[j / 4]) | (uint32_t(row[j / 4 + 1]) << 8);
            __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shifts), _mm256_set1_epi32(3));
            _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), off), sc));
        }
    }
    // j is a multiple of 8, so the bit position j*w is byte aligned for any width.
    scalar::unpack_codes(row + j * size_t(w) / 8, w, n - j, offset, scale, dst + j);
}

static void levels_expand(const uint8_t* signs, const uint8_t* codes, int w, size_t n, const float* table,
                          float* dst) {
    size_t j = 0;
    if (w <= 4) {
        const __m256i shifts = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(w));
        const __m256i mask = _mm256_set1_epi32((1 << w) - 1), sel = _mm256_set_epi32(128, 64, 32, 16, 8, 4, 2, 1);
        const __m256 signbit = _mm256_castsi256_ps(_mm256_set1_epi32(int(0x80000000u)));
        const size_t code_bytes = (n * size_t(w) + 7) / 8;
        for (; j + 8 <= n && (w == 0 || j * size_t(w) / 8 + 4 <= code_bytes); j += 8) {
            uint32_t word = 0;
            if (w) std::memcpy(&word, codes + j * size_t(w) / 8, 4);
            __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shifts), mask);
            __m256 v = _mm256_i32gather_ps(table, c, 4);
            __m256i b = _mm256_and_si256(_mm256_set1_epi32(signs[j / 8]), sel);
            __m256 pos = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, sel));
            _mm256_storeu_ps(dst + j, _mm256_blendv_ps(_mm256_xor_ps(v, signbit), v, pos));
        }
    }
    scalar::levels_expand(signs + j / 8, codes + j * size_t(w) / 8, w, n - j, table, dst + j);
}

static uint64_t sum_bytes(const uint8_t* p, size_t n) {
    __m256i acc = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), _mm256_setzero_si256()));
    uint64_t lanes[4], s = 0;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), acc);
    for (uint64_t v : lanes) s += v;
    return s + scalar::sum_bytes(p + i, n - i);
}

static uint64_t popcount_bytes(const uint8_t* p, size_t n) { return popcount_words(p, n, scalar::popcount_bytes); }

static void scale(float* dst, size_t n, float s) {
    const __m256 v = _mm256_set1_ps(s);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_loadu_ps(dst + j), v));
    for (; j < n; ++j) dst[j] *= s;
}

template <int NR>
static void lowrank_block(const float* U, const float* V, int r, size_t cols, float* dst) {
    size_t j = 0;
    for (; j + 16 <= cols; j += 16) {
        __m256 acc[NR][2];
        for (int i = 0; i < NR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int k = 0; k < r; ++k) {
            const float* v = V + size_t(k) * cols + j;
            __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
            for (int i = 0; i < NR; ++i) {
                __m256 u = _mm256_broadcast_ss(U + size_t(i) * r + k);
                acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_mul_ps(u, v0));
                acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_mul_ps(u, v1));
            }
        }
        for (int i = 0; i < NR; ++i) {
            _mm256_storeu_ps(dst + size_t(i) * cols + j, acc[i][0]);
            _mm256_storeu_ps(dst + size_t(i) * cols + j + 8, acc[i][1]);
        }
    }
    scalar::lowrank_tail(U, V, r, cols, j, NR, dst);
}

static void lowrank_rows(const float* U, const float* V, int r, size_t cols, int nr, float* dst) {
    int i = 0;
    for (; i + 4 <= nr; i += 4) lowrank_block<4>(U + size_t(i) * r, V, r, cols, dst + size_t(i) * cols);
    for (; i < nr; ++i) lowrank_block<1>(U + size_t(i) * r, V, r, cols, dst + size_t(i) * cols);
}

// Dots (mixed batches, decoded tiles): blocks of R rows x K batch rows, 16 lanes per sum as two registers
// (lanes 0-7, 8-15); the tail and the fold are the scalar code's.
template <int R, int K>
static void block_dots(const float* a, size_t stride, const float* x, size_t ldx, size_t n, float* out, int nx) {
    __m256 lo[R][K], hi[R][K];
    for (int i = 0; i < R; ++i)
        for (int b = 0; b < K; ++b) lo[i][b] = hi[i][b] = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int i = 0; i < R; ++i) {
            const __m256 r0 = _mm256_loadu_ps(a + i * stride + j), r1 = _mm256_loadu_ps(a + i * stride + j + 8);
            for (int b = 0; b < K; ++b) {
                const __m256 x0 = _mm256_loadu_ps(x + b * ldx + j), x1 = _mm256_loadu_ps(x + b * ldx + j + 8);
                lo[i][b] = _mm256_add_ps(lo[i][b], _mm256_mul_ps(r0, x0));
                hi[i][b] = _mm256_add_ps(hi[i][b], _mm256_mul_ps(r1, x1));
            }
        }
    for (int i = 0; i < R; ++i)
        for (int b = 0; b < K; ++b) {
            float lanes[16];
            _mm256_storeu_ps(lanes, lo[i][b]);
            _mm256_storeu_ps(lanes + 8, hi[i][b]);
            out[i * nx + b] = scalar::dot_tail(lanes, a + i * stride, x + b * ldx, j, n);
        }
}

static void dots(const float* a, size_t as, int nrows, const float* x, size_t ldx, int nx, size_t n, float* out) {
    by_blocks<2, 2>(nrows, nx, [&](auto r, auto k, int i, int b) {
        block_dots<r(), k()>(a + size_t(i) * as, as, x + size_t(b) * ldx, ldx, n, out + i * nx + b, nx);
    });
}

// 8 rows' 32-byte pieces -> 8 registers, register w holding dword w of every row (lane l: row l): 32-bit and
// 64-bit interleaves within 128-bit lanes, then one round of 128-bit lane shuffles.
static inline void transpose_rows(__m256i v[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int g = 0; g < 2; ++g) {  // u[4g + c], 128-bit lane h: rows 4g .. 4g + 3 of dword 4h + c
        u[4 * g] = _mm256_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm256_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm256_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm256_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        v[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
        v[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
}

// Table sums with a row in each lane: R registers of 8 rows (the last `rows` may end early) x K batch rows.
// Each register holds 32 bits of each of its 8 rows. A group's 16 table entries are two registers: vpermps
// looks the nibble's low 3 bits up in both (it reads only those), and its bit 3, moved to the sign bit, picks
// one. The bits come 32 bytes per row at a time, transposed in registers; 32-bit gathers for the columns
// after the last whole 256, and the scalar code for those after the last 32.
template <int R, int K, bool SPANS>
__attribute__((noinline)) static void table_block(const uint8_t* bits, size_t stride, int rows, const float* t,
                                                  int nx, size_t n, size_t span_groups, float* done, float* out) {
    __m256 acc[R][K];
    for (auto& row : acc)
        for (auto& v : row) v = _mm256_setzero_ps();
    TableSpans<8, R, K> spans(span_groups, done);
    const size_t ts = size_t(nx) * 16;
    auto add_step = [&](const __m256i* v, size_t s) {
        if constexpr (SPANS) {
            if (spans.starts_span(8 * s)) {
                float* to = spans.keep();
                for (int r = 0; r < R; ++r)
                    for (int b = 0; b < K; ++b) {
                        _mm256_storeu_ps(to + (r * K + b) * 8, acc[r][b]);
                        acc[r][b] = _mm256_setzero_ps();
                    }
            }
        }
        const float* tq = t + 8 * s * ts;
        for (int k = 0; k < 8; ++k, tq += ts) {
            for (int r = 0; r < R; ++r) {
                const __m256i idx = _mm256_srli_epi32(v[r], 4 * k);
                const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(v[r], 28 - 4 * k));
                for (int b = 0; b < K; ++b) {
                    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(tq + 16 * b), idx);
                    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(tq + 16 * b + 8), idx);
                    acc[r][b] = _mm256_add_ps(acc[r][b], _mm256_blendv_ps(lo, hi, high));
                }
            }
        }
    };
    size_t s = 0;  // 32-column steps done
    for (; 32 * s + 256 <= n; s += 8) {
        __m256i lines[R][8];
        for (int r = 0; r < R; ++r) {
            for (int l = 0; l < 8; ++l) {
                const uint8_t* piece = bits + size_t(8 * r + l) * stride + 4 * s;
                if (8 * r + l < rows) {
                    lines[r][l] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(piece));
                    _mm_prefetch(reinterpret_cast<const char*>(piece + 128), _MM_HINT_T0);  // as AVX-512 does
                } else {
                    lines[r][l] = _mm256_setzero_si256();
                }
            }
            transpose_rows(lines[r]);
        }
        for (int w = 0; w < 8; ++w) {
            __m256i v[R];
            for (int r = 0; r < R; ++r) v[r] = lines[r][w];
            add_step(v, s + size_t(w));
        }
    }
    const __m256i offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int(stride)));
    __m256i live[R];
    for (int r = 0; r < R; ++r)
        live[r] = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows - 8 * r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (; 32 * s + 32 <= n; ++s) {
        __m256i v[R];
        for (int r = 0; r < R; ++r)
            v[r] = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(),
                                               reinterpret_cast<const int*>(bits + size_t(8 * r) * stride + 4 * s),
                                               offsets, live[r], 1);
        add_step(v, s);
    }
    float running[R * K * 8];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < K; ++b) _mm256_storeu_ps(running + (r * K + b) * 8, acc[r][b]);
    spans.finish(running, bits, stride, rows, t, nx, n, 8 * s, out);
}

// Blocks of 16 rows x 2 batch rows (a table register loaded once serves 16 rows), then narrower ones.
static void table_sums(const uint8_t* bits, size_t bs, int nrows, const float* t, int nx, size_t n, size_t span_groups,
                       float* out) {
    // 32-bit gather offsets; spans that end inside a 32-column step (groups of 8 to 24 columns)
    if (bs > size_t(INT32_MAX / 8) || (span_groups % 8 && table_spans(n, span_groups) > 1))
        return scalar::table_sums(bits, bs, nrows, t, nx, n, span_groups, out);
    table_sums_by_blocks<8, 2, 2>(bits, bs, nrows, t, nx, n, span_groups, out,
        [&](auto r, auto k, auto spans, const uint8_t* rb, int rows, const float* tb, float* done, float* o) {
            table_block<r(), k(), spans()>(rb, bs, rows, tb, nx, n, span_groups, done, o);
        });
}

}  // namespace deltapack::avx2

namespace deltapack {
const Kernels kAvx2Kernels = {"avx2", avx2::to_f32, avx2::add_round, avx2::sign_expand,
                                sign_add_round_by_parts<avx2::sign_expand, avx2::add_round>,
                              avx2::pack_signs, avx2::abs_sum, avx2::unpack_codes,
                              scalar::sparse_expand, avx2::levels_expand, scalar::gaps_scatter, avx2::sum_bytes, avx2::popcount_bytes, avx2::scale, avx2::lowrank_rows,
                              scalar::sign_tables, avx2::table_sums, avx2::dots};
}
