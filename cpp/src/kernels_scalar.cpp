// The portable path: plain C++, the reference every SIMD path is tested against.
#include <cmath>

#include "kernels.h"

namespace deltapack::scalar {

void to_f32(const void* src, DType t, float* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = load_one(src, t, i);
}

bool add_round(const void* base, DType bt, const float* d, float alpha, void* out, DType ot, size_t n, bool) {
    bool ok = true;
    for (size_t i = 0; i < n; ++i) store_one(out, ot, i, rebuild_sum(load_one(base, bt, i), alpha, d[i], ok));
    return ok;
}

void sign_expand(const uint8_t* bits, size_t n, float s, float* dst) {
    for (size_t j = 0; j < n; ++j) dst[j] = ((bits[j >> 3] >> (j & 7)) & 1) ? s : -s;
}

void pack_signs(const float* x, size_t n, uint8_t* bits) {
    size_t nb = (n + 7) / 8;
    for (size_t b = 0; b < nb; ++b) {
        uint8_t v = 0;
        for (size_t k = 0; k < 8 && b * 8 + k < n; ++k) v |= uint8_t(x[b * 8 + k] > 0.0f) << k;
        bits[b] = v;
    }
}

void levels_expand(const uint8_t* signs, const uint8_t* codes, int w, size_t n, const float* table,
                   float* dst) {
    for (size_t j = 0; j < n; ++j) {
        float v = table[w ? read_code(codes, w, j) : 0];
        dst[j] = ((signs[j >> 3] >> (j & 7)) & 1) ? v : -v;
    }
}

void fold_lanes(double lanes[16]) { fold_16_lanes(lanes); }

float dot_tail(float lanes[16], const float* a, const float* x, size_t j0, size_t n) {
    for (size_t j = j0; j < n; ++j) lanes[j & 15] = lanes[j & 15] + a[j] * x[j];
    return fold_16_lanes(lanes);
}

void sign_tables(const float* x, size_t ldx, int nx, size_t n, float* t) {
    for (size_t q = 0; 4 * q < n; ++q)
        for (int b = 0; b < nx; ++b)
            for (unsigned m = 0; m < 16; ++m)
                t[(q * size_t(nx) + size_t(b)) * 16 + m] = group_sum(x + size_t(b) * ldx, int64_t(n), int64_t(q), m);
}

void table_sums(const uint8_t* bits, size_t bits_stride, int nrows, const float* t, int nx, size_t n,
                size_t span_groups, float* out) {
    if (n == 0) return std::fill(out, out + size_t(nrows) * size_t(nx), 0.0f);  // no tables (t may be null)
    const size_t spans = table_spans(n, span_groups);
    for (int i = 0; i < nrows; ++i)
        for (int b = 0; b < nx; ++b)
            table_span_tail(0.0f, bits + size_t(i) * bits_stride, t + size_t(b) * 16, nx, 0, (n + 3) / 4, span_groups,
                            out + size_t(i) * spans * size_t(nx) + size_t(b));
}

static void dots(const float* a, size_t a_stride, int nrows, const float* x, size_t ldx, int nx, size_t n,
                 float* out) {
    for (int i = 0; i < nrows; ++i)
        for (int b = 0; b < nx; ++b) {
            float lanes[16] = {0};
            out[i * nx + b] = dot_tail(lanes, a + size_t(i) * a_stride, x + size_t(b) * ldx, 0, n);
        }
}

static double abs_sum(const float* x, size_t n) {
    double lanes[16] = {0};
    for (size_t j = 0; j < n; ++j) lanes[j & 15] += double(std::fabs(x[j]));
    fold_lanes(lanes);
    return lanes[0];
}

void unpack_codes(const uint8_t* row, int w, size_t n, float offset, float scale, float* dst) {
    for (size_t j = 0; j < n; ++j) dst[j] = (float(read_code(row, w, j)) - offset) * scale;
}

void sparse_expand(const uint8_t* mask, const void* values, DType vt, float vscale, size_t n, float* dst) {
    size_t e = 0;
    for (size_t j = 0; j < n; ++j)
        dst[j] = ((mask[j >> 3] >> (j & 7)) & 1) ? sparse_value(values, vt, e++, vscale) : 0.0f;
}

// Zeroed with plain stores, not memset: rep stosb leaves the lines slow to re-read on some cores.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void gaps_scatter(const uint8_t* gaps,
                                                                                const float* vals, size_t count,
                                                                                float* dst, size_t cols) {
    for (size_t j = 0; j < cols; ++j) dst[j] = 0.0f;
    size_t next = 0;  // the column after the previous entry
    for (size_t q = 0; q < count; ++q) {
        next += gaps[q];
        if (f32_to_bits(vals[q])) dst[next] = vals[q];  // +0 (fillers) is already there
        ++next;
    }
}

uint64_t sum_bytes(const uint8_t* p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; ++i) s += p[i];
    return s;
}

uint64_t popcount_bytes(const uint8_t* p, size_t n) {
    uint64_t c = 0;
    for (size_t i = 0; i < n; ++i) c += uint64_t(__builtin_popcount(p[i]));
    return c;
}

static void scale(float* dst, size_t n, float s) {
    for (size_t j = 0; j < n; ++j) dst[j] *= s;
}

void lowrank_tail(const float* U, const float* V, int r, size_t cols, size_t j0, int nr, float* dst) {
    for (int i = 0; i < nr; ++i)
        for (size_t c = j0; c < cols; ++c) {
            float acc = 0.0f;
            for (int k = 0; k < r; ++k) acc = acc + U[size_t(i) * r + k] * V[size_t(k) * cols + c];
            dst[size_t(i) * cols + c] = acc;
        }
}

void lowrank_rows(const float* U, const float* V, int r, size_t cols, int nr, float* dst) {
    for (int i = 0; i < nr; ++i) {
        float* out = dst + size_t(i) * cols;
        for (size_t j = 0; j < cols; ++j) out[j] = 0.0f;
        for (int k = 0; k < r; ++k) {
            const float u = U[size_t(i) * r + k];
            const float* v = V + size_t(k) * cols;
            for (size_t j = 0; j < cols; ++j) out[j] = out[j] + u * v[j];
        }
    }
}

}  // namespace deltapack::scalar

namespace deltapack {
const Kernels kScalarKernels = {"scalar", scalar::to_f32, scalar::add_round, scalar::sign_expand,
                                sign_add_round_by_parts<scalar::sign_expand, scalar::add_round>,
                                scalar::pack_signs, scalar::abs_sum, scalar::unpack_codes,
                                scalar::sparse_expand, scalar::levels_expand, scalar::gaps_scatter, scalar::sum_bytes, scalar::popcount_bytes, scalar::scale, scalar::lowrank_rows,
                                scalar::sign_tables, scalar::table_sums, scalar::dots};
}
