// NEON (AArch64 Advanced SIMD) path, 4 lanes. f16 conversions use the FCVT instructions (round to
// nearest even under the default FPCR, denormals kept); bf16 rounding is integer arithmetic.
// Kernels without a NEON body here (levels_expand, sparse_expand) use the scalar code.
#include <arm_neon.h>

#include <cmath>

#include "kernels.h"

namespace deltapack::neon {

static inline float32x4_t load4(const void* p, DType t, size_t i) {
    switch (t) {
        case DType::F32: return vld1q_f32(static_cast<const float*>(p) + i);
        case DType::F16:
            return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const uint16_t*>(p) + i)));
        default:
            return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(static_cast<const uint16_t*>(p) + i), 16));
    }
}

static inline uint16x4_t to_bf16(float32x4_t v) {
    uint32x4_t u = vreinterpretq_u32_f32(v);
    uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    uint32x4_t r = vshrq_n_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7fff)), lsb), 16);
    uint32x4_t nan = vcgtq_u32(vandq_u32(u, vdupq_n_u32(0x7fffffff)), vdupq_n_u32(0x7f800000));
    uint32x4_t q = vorrq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(0x40));
    return vmovn_u32(vbslq_u32(nan, q, r));
}

static inline void store4(void* p, DType t, size_t i, float32x4_t v) {
    switch (t) {
        case DType::F32: vst1q_f32(static_cast<float*>(p) + i, v); break;
        case DType::F16:
            vst1_u16(static_cast<uint16_t*>(p) + i, vreinterpret_u16_f16(vcvt_f16_f32(v)));
            break;
        default: vst1_u16(static_cast<uint16_t*>(p) + i, to_bf16(v)); break;
    }
}

static void to_f32(const void* src, DType t, float* dst, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, load4(src, t, i));
    for (; i < n; ++i) dst[i] = load_one(src, t, i);
}

// NEON has no streaming-store hint worth using from intrinsics; `stream` is ignored.
static bool add_round(const void* base, DType bt, const float* d, float alpha, void* out, DType ot, size_t n,
                      bool) {
    const float32x4_t a = vdupq_n_f32(alpha), limit = vdupq_n_f32(kMaxStep);
    uint32x4_t ok = vdupq_n_u32(~0u);
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {  // vmulq + vaddq, never vfmaq: one rounding per operation
        float32x4_t t = vmulq_f32(a, vld1q_f32(d + i));
        ok = vandq_u32(ok, vcleq_f32(vabsq_f32(t), limit));  // false for NaN
        store4(out, ot, i, vaddq_f32(load4(base, bt, i), t));
    }
    bool tail_ok = true;
    for (; i < n; ++i) {
        float t = alpha * d[i];
        tail_ok &= std::fabs(t) <= kMaxStep;
        store_one(out, ot, i, load_one(base, bt, i) + t);
    }
    return tail_ok && vminvq_u32(ok) != 0;
}

static void sign_expand(const uint8_t* bits, size_t n, float s, float* dst) {
    const float32x4_t pos = vdupq_n_f32(s), neg = vdupq_n_f32(-s);
    const uint32x4_t lo = {1, 2, 4, 8}, hi = {16, 32, 64, 128};
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        uint32x4_t b = vdupq_n_u32(bits[j / 8]);
        vst1q_f32(dst + j, vbslq_f32(vtstq_u32(b, lo), pos, neg));
        vst1q_f32(dst + j + 4, vbslq_f32(vtstq_u32(b, hi), pos, neg));
    }
    scalar::sign_expand(bits + j / 8, n - j, s, dst + j);
}

static void pack_signs(const float* x, size_t n, uint8_t* bits) {
    const uint32x4_t lo = {1, 2, 4, 8}, hi = {16, 32, 64, 128};
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        uint32x4_t a = vandq_u32(vcgtq_f32(vld1q_f32(x + j), vdupq_n_f32(0.0f)), lo);
        uint32x4_t b = vandq_u32(vcgtq_f32(vld1q_f32(x + j + 4), vdupq_n_f32(0.0f)), hi);
        bits[j / 8] = uint8_t(vaddvq_u32(vorrq_u32(a, b)));
    }
    scalar::pack_signs(x + j, n - j, bits + j / 8);
}

static double abs_sum(const float* x, size_t n) {
    float64x2_t l[8];  // lanes 0-1, 2-3, ..., 14-15
    for (auto& v : l) v = vdupq_n_f64(0.0);
    size_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int q = 0; q < 4; ++q) {
            float32x4_t v = vabsq_f32(vld1q_f32(x + j + 4 * q));
            l[2 * q] = vaddq_f64(l[2 * q], vcvt_f64_f32(vget_low_f32(v)));
            l[2 * q + 1] = vaddq_f64(l[2 * q + 1], vcvt_high_f64_f32(v));
        }
    double lanes[16];
    for (int q = 0; q < 8; ++q) vst1q_f64(lanes + 2 * q, l[q]);
    for (size_t k = 0; j + k < n; ++k) lanes[k] += double(x[j + k] < 0 ? -x[j + k] : x[j + k]);
    scalar::fold_lanes(lanes);
    return lanes[0];
}

static void unpack_codes(const uint8_t* row, int w, size_t n, float offset, float scale, float* dst) {
    const float32x4_t off = vdupq_n_f32(offset), sc = vdupq_n_f32(scale);
    size_t j = 0;
    if (w == 8 || w == 4) {
        for (; j + 16 <= n; j += 16) {
            uint8x16_t c;
            if (w == 8) {
                c = vld1q_u8(row + j);
            } else {  // 8 bytes -> 16 nibbles, low nibble first
                uint8x8_t b = vld1_u8(row + j / 2);
                c = vcombine_u8(vzip1_u8(vand_u8(b, vdup_n_u8(15)), vshr_n_u8(b, 4)),
                                vzip2_u8(vand_u8(b, vdup_n_u8(15)), vshr_n_u8(b, 4)));
            }
            uint16x8_t h0 = vmovl_u8(vget_low_u8(c)), h1 = vmovl_high_u8(c);
            uint32x4_t q[4] = {vmovl_u16(vget_low_u16(h0)), vmovl_high_u16(h0), vmovl_u16(vget_low_u16(h1)),
                               vmovl_high_u16(h1)};
            for (int k = 0; k < 4; ++k)
                vst1q_f32(dst + j + 4 * k, vmulq_f32(vsubq_f32(vcvtq_f32_u32(q[k]), off), sc));
        }
    }
    scalar::unpack_codes(row + j * size_t(w) / 8, w, n - j, offset, scale, dst + j);
}

static uint64_t sum_bytes(const uint8_t* p, size_t n) {
    uint64_t s = 0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) s += vaddlvq_u8(vld1q_u8(p + i));
    return s + scalar::sum_bytes(p + i, n - i);
}

static uint64_t popcount_bytes(const uint8_t* p, size_t n) {
    uint64_t c = 0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) c += vaddlvq_u8(vcntq_u8(vld1q_u8(p + i)));
    return c + scalar::popcount_bytes(p + i, n - i);
}

static void scale(float* dst, size_t n, float s) {
    const float32x4_t v = vdupq_n_f32(s);
    size_t j = 0;
    for (; j + 4 <= n; j += 4) vst1q_f32(dst + j, vmulq_f32(vld1q_f32(dst + j), v));
    for (; j < n; ++j) dst[j] *= s;
}

// NR rows x 16 columns per step, accumulators in registers while k runs.
template <int NR>
static void lowrank_block(const float* U, const float* V, int r, size_t cols, float* dst) {
    size_t j = 0;
    for (; j + 16 <= cols; j += 16) {
        float32x4_t acc[NR][4];
        for (int i = 0; i < NR; ++i)
            for (int q = 0; q < 4; ++q) acc[i][q] = vdupq_n_f32(0.0f);
        for (int k = 0; k < r; ++k) {
            const float* v = V + size_t(k) * cols + j;
            float32x4_t v0 = vld1q_f32(v), v1 = vld1q_f32(v + 4), v2 = vld1q_f32(v + 8), v3 = vld1q_f32(v + 12);
            for (int i = 0; i < NR; ++i) {
                float32x4_t u = vdupq_n_f32(U[size_t(i) * r + k]);
                acc[i][0] = vaddq_f32(acc[i][0], vmulq_f32(u, v0));
                acc[i][1] = vaddq_f32(acc[i][1], vmulq_f32(u, v1));
                acc[i][2] = vaddq_f32(acc[i][2], vmulq_f32(u, v2));
                acc[i][3] = vaddq_f32(acc[i][3], vmulq_f32(u, v3));
            }
        }
        for (int i = 0; i < NR; ++i)
            for (int q = 0; q < 4; ++q) vst1q_f32(dst + size_t(i) * cols + j + 4 * q, acc[i][q]);
    }
    scalar::lowrank_tail(U, V, r, cols, j, NR, dst);
}

static void lowrank_rows(const float* U, const float* V, int r, size_t cols, int nr, float* dst) {
    int i = 0;
    for (; i + 4 <= nr; i += 4) lowrank_block<4>(U + size_t(i) * r, V, r, cols, dst + size_t(i) * cols);
    for (; i < nr; ++i) lowrank_block<1>(U + size_t(i) * r, V, r, cols, dst + size_t(i) * cols);
}

// Dots (mixed batches, decoded tiles): blocks of R rows x K batch rows, 16 lanes per sum as four registers
// (lanes 0-3, ..., 12-15); the tail and the fold are the scalar code's.
template <int R, int K>
static void block_dots(const float* a, size_t stride, const float* x, size_t ldx, size_t n, float* out, int nx) {
    float32x4_t acc[R][K][4];
    for (int i = 0; i < R; ++i)
        for (int b = 0; b < K; ++b)
            for (auto& v : acc[i][b]) v = vdupq_n_f32(0.0f);
    size_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int i = 0; i < R; ++i)
            for (int q = 0; q < 4; ++q) {
                const float32x4_t av = vld1q_f32(a + i * stride + j + 4 * q);
                for (int b = 0; b < K; ++b)
                    acc[i][b][q] = vaddq_f32(acc[i][b][q], vmulq_f32(av, vld1q_f32(x + b * ldx + j + 4 * q)));
            }
    for (int i = 0; i < R; ++i)
        for (int b = 0; b < K; ++b) {
            float lanes[16];
            for (int q = 0; q < 4; ++q) vst1q_f32(lanes + 4 * q, acc[i][b][q]);
            out[i * nx + b] = scalar::dot_tail(lanes, a + i * stride, x + b * ldx, j, n);
        }
}

static void dots(const float* a, size_t as, int nrows, const float* x, size_t ldx, int nx, size_t n, float* out) {
    by_blocks<2, 2>(nrows, nx, [&](auto r, auto k, int i, int b) {
        block_dots<r(), k()>(a + size_t(i) * as, as, x + size_t(b) * ldx, ldx, n, out + i * nx + b, nx);
    });
}

// Table sums with a row in each lane: R registers of 4 rows (the last `rows` may end early) x K batch rows.
// A group's 16 table entries are 64 bytes in four registers; lane l's nibble m becomes the byte indices
// 4m .. 4m + 3, and one tbl looks 4 rows' entries up. The groups after the last whole 32 columns are the
// scalar code's.
template <int R, int K, bool SPANS>
__attribute__((noinline)) static void table_block(const uint8_t* bits, size_t stride, int rows, const float* t,
                                                  int nx, size_t n, size_t span_groups, float* done, float* out) {
    float32x4_t acc[R][K];
    for (auto& row : acc)
        for (auto& v : row) v = vdupq_n_f32(0.0f);
    TableSpans<4, R, K> spans(span_groups, done);
    const size_t steps = n / 32, ts = size_t(nx) * 16;
    const uint32x4_t nibble = vdupq_n_u32(15), byte_of_entry = vdupq_n_u32(0x03020100u);
    for (size_t s = 0; s < steps; ++s) {
        uint32x4_t v[R];
        for (int r = 0; r < R; ++r) {
            uint32_t w[4] = {0, 0, 0, 0};  // 32 bits of each row
            for (int l = 0; l < 4 && 4 * r + l < rows; ++l) std::memcpy(&w[l], bits + size_t(4 * r + l) * stride + 4 * s, 4);
            v[r] = vld1q_u32(w);
        }
        const float* tq = t + 8 * s * ts;
        if constexpr (SPANS) {
            if (spans.starts_span(8 * s)) {
                float* to = spans.keep();
                for (int r = 0; r < R; ++r)
                    for (int b = 0; b < K; ++b) {
                        vst1q_f32(to + (r * K + b) * 4, acc[r][b]);
                        acc[r][b] = vdupq_n_f32(0.0f);
                    }
            }
        }
        for (int k = 0; k < 8; ++k, tq += ts) {
            uint8x16_t idx[R];
            for (int r = 0; r < R; ++r) {
                const uint32x4_t m = vandq_u32(vshlq_u32(v[r], vdupq_n_s32(-4 * k)), nibble);
                idx[r] = vreinterpretq_u8_u32(vmlaq_n_u32(byte_of_entry, m, 0x04040404u));
            }
            for (int b = 0; b < K; ++b) {
                const uint8x16x4_t table = vld1q_u8_x4(reinterpret_cast<const uint8_t*>(tq + 16 * b));
                for (int r = 0; r < R; ++r)
                    acc[r][b] = vaddq_f32(acc[r][b], vreinterpretq_f32_u8(vqtbl4q_u8(table, idx[r])));
            }
        }
    }
    float running[R * K * 4];
    for (int r = 0; r < R; ++r)
        for (int b = 0; b < K; ++b) vst1q_f32(running + (r * K + b) * 4, acc[r][b]);
    spans.finish(running, bits, stride, rows, t, nx, n, 8 * steps, out);
}

// Blocks of 16 rows x 2 batch rows (a table register loaded once serves 16 rows), then narrower ones.
static void table_sums(const uint8_t* bits, size_t bs, int nrows, const float* t, int nx, size_t n, size_t span_groups,
                       float* out) {
    // spans that end inside a 32-column step (groups of 8 to 24 columns)
    if (span_groups % 8 && table_spans(n, span_groups) > 1) return scalar::table_sums(bits, bs, nrows, t, nx, n, span_groups, out);
    table_sums_by_blocks<4, 4, 2>(bits, bs, nrows, t, nx, n, span_groups, out,
        [&](auto r, auto k, auto spans, const uint8_t* rb, int rows, const float* tb, float* done, float* o) {
            table_block<r(), k(), spans()>(rb, bs, rows, tb, nx, n, span_groups, done, o);
        });
}

}  // namespace deltapack::neon

namespace deltapack {
const Kernels kNeonKernels = {"neon", neon::to_f32, neon::add_round, neon::sign_expand,
                                sign_add_round_by_parts<neon::sign_expand, neon::add_round>, neon::pack_signs,
                              neon::abs_sum, neon::unpack_codes, scalar::sparse_expand, scalar::levels_expand,
                              scalar::gaps_scatter, neon::sum_bytes, neon::popcount_bytes, neon::scale, neon::lowrank_rows,
                              scalar::sign_tables, neon::table_sums, neon::dots};
}
