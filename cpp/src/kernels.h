// The SIMD kernel table. Each path (scalar, AVX2, AVX-512) fills one Kernels struct; they must
// give bit-identical results (no FMA, no reassociation; the fixed lane order of abs_sum).
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "deltapack/deltapack.h"
#include "element.h"

namespace deltapack {

struct Kernels {
    const char* name;
    // dst[i] = exact f32 value of src[i]; src dtype f32, f16 or bf16.
    void (*to_f32)(const void* src, DType t, float* dst, size_t n);
    // out[i] = round_ot(f32(base[i]) + alpha * d[i]) with one f32 product and one f32 sum.
    // stream: use non-temporal stores for out (large out-of-place outputs; caller fences).
    // Returns whether every alpha * d[i] lies in [-kMaxStep, kMaxStep] (a NaN does not): checked on the
    // products in registers, so the engine's guard against damaged deltas costs no extra pass.
    bool (*add_round)(const void* base, DType bt, const float* d, float alpha, void* out, DType ot,
                      size_t n, bool stream);
    // dst[j] = bit j of `bits` (LSB-first) ? s : -s.
    void (*sign_expand)(const uint8_t* bits, size_t n, float s, float* dst);
    // add_round of a sign row without expanding it: out[i] = round_ot(f32(base[i]) + (bit i ? t : -t)), where
    // t = alpha * s (then alpha * -s = -t, so the bits are those of sign_expand + add_round). The caller has
    // checked |t| <= kMaxStep.
    void (*sign_add_round)(const uint8_t* bits, float t, const void* base, DType bt, void* out, DType ot, size_t n,
                           bool stream);
    // bits j = (x[j] > 0), LSB-first; the last byte is zero-padded.
    void (*pack_signs)(const float* x, size_t n, uint8_t* bits);
    // Sum of |x[j]| in float64 in the 16-lane order of reference.lane_sum.
    double (*abs_sum)(const float* x, size_t n);
    // dst[j] = (float(code j) - offset) * scale, codes `w` bits wide (1..8) packed LSB-first from `row`.
    void (*unpack_codes)(const uint8_t* row, int w, size_t n, float offset, float scale, float* dst);
    // dst[j] = bit j of mask ? next value : 0; values f32/f16/bf16, or i8 times vscale.
    void (*sparse_expand)(const uint8_t* mask, const void* values, DType vt, float vscale, size_t n, float* dst);
    // dst[j] = (sign bit j ? 1 : -1) * table[code j], codes `w` bits wide (0..7; 0 = all code 0).
    void (*levels_expand)(const uint8_t* signs, const uint8_t* codes, int w, size_t n, const float* table,
                          float* dst);
    // dst[0, cols) = 0, then dst[c_q] = vals[q] for q < count, where c_q = sum_{i<=q}(gaps[i] + 1) - 1
    // (the byte-gap index; the caller has checked that every c_q < cols). Columns are 64-bit (rows may
    // be wider than 2^31); +0 values (the fillers) are not written, so with cols = 0 only the nonzero
    // entries touch dst.
    void (*gaps_scatter)(const uint8_t* gaps, const float* vals, size_t count, float* dst, size_t cols);
    // Sum of the bytes, and number of set bits (sparse index validation).
    uint64_t (*sum_bytes)(const uint8_t* p, size_t n);
    uint64_t (*popcount_bytes)(const uint8_t* p, size_t n);
    // dst[j] *= s.
    void (*scale)(float* dst, size_t n, float s);
    // dst (nr x cols) = U (nr x r) @ V (r x cols), summing k = 0..r-1 in order, unfused.
    void (*lowrank_rows)(const float* U, const float* V, int r, size_t cols, int nr, float* dst);
    // Batch products (mixed batches): out[i * nx + b] for i < nrows, b < nx, with the rows
    // bits_i = bits + i * bits_stride (resp. a_i = a + i * a_stride) and x_b = x + b * ldx.
    // Sign rows use tables of the batch: for each group q of 4 columns (the last one may be shorter) and batch
    // row b, sign_tables writes t[(q * nx + b) * 16 + m] = the sum of x_b[4q + c] over the bits c of m with
    // 4q + c < n, added in the order c = 0..3 to +0 (so an entry is never -0); ceil(n / 4) * nx * 16 floats.
    // table_sums then gives, for each span of `span_groups` groups (the last may be shorter; table_spans(n,
    // span_groups) of them, at least one), the sum of x_b[j] over the set bits j of bits_i (LSB-first) in the
    // span: out[(i * spans + g) * nx + b], an f32 sum over the span's groups in order from +0, each step adding
    // the entry of the group's 4 bits (n = 0: one span, +0). A row costs one add per 4 columns and batch row
    // (python/deltapack/reference.py: sign_tables, table_sums, sign_product).
    void (*sign_tables)(const float* x, size_t ldx, int nx, size_t n, float* t);
    void (*table_sums)(const uint8_t* bits, size_t bits_stride, int nrows, const float* t, int nx, size_t n,
                       size_t span_groups, float* out);
    // dots: the sum of a_i[j] * x_b[j] over j < n (f32 products), in 16 lanes: element j goes to lane j % 16,
    // lanes start at +0, then lane[i] += lane[i+8], +4, +2, +1 -> lane 0.
    void (*dots)(const float* a, size_t a_stride, int nrows, const float* x, size_t ldx, int nx, size_t n,
                 float* out);
};

extern const Kernels kScalarKernels;
#ifdef DELTAPACK_X86
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;
#endif
#ifdef DELTAPACK_ARM
extern const Kernels kNeonKernels;
#endif

const Kernels& kernels();  // the active path
void store_fence();        // orders streaming stores before returning to the caller

// Set bits of n bytes, 8 at a time. `static`: each SIMD file compiles its own copy with its own
// flags (e.g. -mpopcnt), which an ordinary inline function shared across files would not allow.
static inline uint64_t popcount_words(const uint8_t* p, size_t n, uint64_t (*tail)(const uint8_t*, size_t)) {
    uint64_t c = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        std::memcpy(&w, p + i, 8);
        c += uint64_t(__builtin_popcountll(w));
    }
    return c + tail(p + i, n - i);
}

// Scalar versions, used by every path for tails.
namespace scalar {
void to_f32(const void* src, DType t, float* dst, size_t n);
bool add_round(const void* base, DType bt, const float* d, float alpha, void* out, DType ot, size_t n,
               bool stream);
void sign_expand(const uint8_t* bits, size_t n, float s, float* dst);
void pack_signs(const float* x, size_t n, uint8_t* bits);
void unpack_codes(const uint8_t* row, int w, size_t n, float offset, float scale, float* dst);
void sparse_expand(const uint8_t* mask, const void* values, DType vt, float vscale, size_t n, float* dst);
void lowrank_rows(const float* U, const float* V, int r, size_t cols, int nr, float* dst);
void levels_expand(const uint8_t* signs, const uint8_t* codes, int w, size_t n, const float* table,
                   float* dst);
void fold_lanes(double lanes[16]);
void sign_tables(const float* x, size_t ldx, int nx, size_t n, float* t);
void table_sums(const uint8_t* bits, size_t bits_stride, int nrows, const float* t, int nx, size_t n,
                size_t span_groups, float* out);
}  // namespace scalar

inline size_t table_spans(size_t n, size_t span_groups) { return n ? ((n + 3) / 4 + span_groups - 1) / span_groups : 1; }

// Groups [q0, groups) of one row's table sums, with t the tables of its batch row (offset by b * 16): continues
// acc, the running sum of the span of group q0 - 1 (+0 when q0 = 0), and writes the sum of that span and of
// each one after it to out[span * nx]. The SIMD paths' tail and the whole scalar kernel.
inline void table_span_tail(float acc, const uint8_t* bits, const float* t, int nx, size_t q0, size_t groups,
                            size_t span_groups, float* out) {
    for (size_t q = q0; q < groups; ++q) {
        if (q % span_groups == 0 && q > 0) {
            out[(q / span_groups - 1) * size_t(nx)] = acc;
            acc = 0.0f;
        }
        acc = acc + t[q * size_t(nx) * 16 + ((bits[q >> 1] >> ((q & 1) * 4)) & 15u)];
    }
    out[(groups ? (groups - 1) / span_groups : 0) * size_t(nx)] = acc;
}

// The spans of a SIMD path's block of table sums: R registers of LANES rows (lane l of register r: row
// LANES * r + l) x K batch rows, their running sums stored [r][b][lane] where a span ends, in memory the caller
// owns (table_spans(n, span_groups) * R * K * LANES floats). Trivially destructible, with no calls in the SIMD
// loop: anything else made GCC keep the running sums in memory (1.4x slower).
template <int LANES, int R, int K>
struct TableSpans {
    static constexpr size_t kSums = size_t(R) * K * LANES;
    size_t span_groups, next_span;  // the group that starts the next span
    float* done;                    // finished spans' sums [span][r][b][lane]
    size_t finished = 0;
    TableSpans(size_t span_groups, float* done) : span_groups(span_groups), next_span(span_groups), done(done) {}
    // Whether group q starts a new span: then the running sums go to keep() and restart from +0.
    bool starts_span(size_t q) const { return q == next_span; }
    float* keep() {
        next_span += span_groups;
        return done + kSums * finished++;
    }
    // Every row's sums, given the running ones [r][b][lane] after the SIMD steps; the groups from q0 on are the
    // scalar tail's.
    void finish(const float* running, const uint8_t* bits, size_t stride, int rows, const float* t, int nx, size_t n,
                size_t q0, float* out) const {
        const size_t groups = (n + 3) / 4, spans = table_spans(n, span_groups);
        for (int r = 0; r < R; ++r)
            for (int b = 0; b < K; ++b)
                for (int l = 0; l < LANES && LANES * r + l < rows; ++l) {
                    const size_t row = size_t(LANES * r + l), at = size_t((r * K + b) * LANES + l);
                    float* o = out + row * spans * size_t(nx) + size_t(b);
                    for (size_t g = 0; g < finished; ++g) o[g * size_t(nx)] = done[g * kSums + at];
                    table_span_tail(running[at], bits + row * stride, t + 16 * b, nx, q0, groups, span_groups, o);
                }
    }
};

namespace scalar {
// Elements [j0, n) of a dot (j0 a multiple of 16) added to the 16 lanes, which are then folded: the SIMD
// paths' tail and the whole scalar kernel.
float dot_tail(float lanes[16], const float* a, const float* x, size_t j0, size_t n);
void gaps_scatter(const uint8_t* gaps, const float* vals, size_t count, float* dst, size_t cols);
// Columns [j0, cols) of lowrank_rows, element by element (the SIMD paths' column tail).
void lowrank_tail(const float* U, const float* V, int r, size_t cols, size_t j0, int nr, float* dst);
uint64_t sum_bytes(const uint8_t* p, size_t n);
uint64_t popcount_bytes(const uint8_t* p, size_t n);  // lane[i] += lane[i+8], +4, +2, +1 -> lanes[0]
}  // namespace scalar

// sign_add_round from a path's sign_expand and add_round, a block of columns at a time (paths without a
// fused loop).
template <void (*Expand)(const uint8_t*, size_t, float, float*),
          bool (*AddRound)(const void*, DType, const float*, float, void*, DType, size_t, bool)>
void sign_add_round_by_parts(const uint8_t* bits, float t, const void* base, DType bt, void* out, DType ot, size_t n,
                             bool stream) {
    float d[1024];
    for (size_t j = 0; j < n; j += 1024) {
        const size_t len = std::min<size_t>(1024, n - j);
        Expand(bits + j / 8, len, t, d);
        AddRound(static_cast<const uint8_t*>(base) + j * dtype_size(bt), bt, d, 1.0f,
                 static_cast<uint8_t*>(out) + j * dtype_size(ot), ot, len, stream);
    }
}

// f(std::integral_constant<int, n>()) for a run-time 1 <= n <= N.
template <int N, class F>
inline void with_count(int n, F f) {
    if constexpr (N > 0) {
        if (n == N) return f(std::integral_constant<int, N>());
        with_count<N - 1>(n, f);
    }
}

// A path's table_sums from its table_block<R, K, SPANS>, called as block(R, K, SPANS, bits of row i, rows, tables
// of batch row b, done, out): rows i .. i + rows (rows <= LANES * R, in R registers of LANES rows) against batch
// rows b .. b + K, with R = RMAX and K = KMAX where they fit; R, K and SPANS are std::integral_constants, usable
// as template arguments. One span per row (tensor and row scales) runs the SPANS = false instantiation: with none
// of the span bookkeeping in the loop, the compiler keeps every running sum in registers. (The paths keep each
// block shape a function of its own, noinline: inlined together, the AVX2 loops lost 25 %.)
template <int LANES, int RMAX, int KMAX, class Block>
inline void table_sums_by_blocks(const uint8_t* bits, size_t bits_stride, int nrows, const float* t, int nx, size_t n,
                                 size_t span_groups, float* out, Block block) {
    if (n == 0) return std::fill(out, out + size_t(nrows) * size_t(nx), 0.0f);  // no tables (t may be null)
    const size_t spans = table_spans(n, span_groups), row_out = spans * size_t(nx);  // outputs per row
    std::vector<float> done(spans > 1 ? spans * RMAX * KMAX * LANES : 0);   // the largest block's finished spans
    for (int i = 0; i < nrows; i += LANES * RMAX) {
        const int rows = std::min(LANES * RMAX, nrows - i);
        const uint8_t* rb = bits + size_t(i) * bits_stride;
        with_count<RMAX>((rows + LANES - 1) / LANES, [&](auto r) {
            auto run = [&](auto k, int b) {
                float* o = out + size_t(i) * row_out + size_t(b);
                if (spans > 1) block(r, k, std::true_type(), rb, rows, t + 16 * b, done.data(), o);
                else block(r, k, std::false_type(), rb, rows, t + 16 * b, done.data(), o);
            };
            int b = 0;
            for (; b + KMAX <= nx; b += KMAX) run(std::integral_constant<int, KMAX>(), b);
            with_count<KMAX - 1>(nx - b, [&](auto k) { run(k, b); });
        });
    }
}

// Calls f(R, K, i, b) over the nrows x nx sums of a batch product in blocks of R rows x K batch rows:
// RMAX x KMAX where they fit, then narrower (independent sums keep the SIMD units busy; a batch row loaded
// once serves R rows). The batch rows left over one at a time (all of them for a batch of 1, a decode step)
// go in blocks of RWIDE rows: as many independent sums again. R and K are std::integral_constants, usable
// as template arguments. The blocks only group sums: each sum is computed the same way in any block.
template <int RMAX, int KMAX, int RWIDE = RMAX, class F>
inline void by_blocks(int nrows, int nx, F f) {
    int b = 0;
    for (; b + KMAX <= nx; b += KMAX) {
        int i = 0;
        for (; i + RMAX <= nrows; i += RMAX) f(std::integral_constant<int, RMAX>(), std::integral_constant<int, KMAX>(), i, b);
        for (; i < nrows; ++i) f(std::integral_constant<int, 1>(), std::integral_constant<int, KMAX>(), i, b);
    }
    for (; b < nx; ++b) {
        int i = 0;
        for (; i + RWIDE <= nrows; i += RWIDE) f(std::integral_constant<int, RWIDE>(), std::integral_constant<int, 1>(), i, b);
        for (; i + RMAX <= nrows; i += RMAX) f(std::integral_constant<int, RMAX>(), std::integral_constant<int, 1>(), i, b);
        for (; i < nrows; ++i) f(std::integral_constant<int, 1>(), std::integral_constant<int, 1>(), i, b);
    }
}

}  // namespace deltapack
