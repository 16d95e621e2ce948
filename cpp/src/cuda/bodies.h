// The CUDA kernels' bodies: what one thread computes, as DP_HD functions of its item index. cuda/device.cu wraps
// each in a __global__ kernel; cuda/emulate.cpp runs the same body over the same grid on the CPU (host emulation:
// tests compare it bit for bit with the CPU engine on machines without a GPU). The numerics are the CPU engine's:
// decode in f32, f32(base) + alpha * d with one product and one sum, one rounding (element.h), and the batch
// products' summation orders of Kernels::dots / sign_tables + table_sums (kernels.h), so the device results are
// the CPU's bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "../element.h"
#include "delta_view.h"

namespace deltapack::cuda {

// ------------------------------------------------------------------------------------------ launch arithmetic

// A launch: `blocks` x `threads` threads over `items` items, for each of `jobs` jobs (gridDim.y). Thread t of block
// b takes items first_item, first_item + item_stride, ...: a grid-stride loop in 64-bit arithmetic, so a grid of
// at most kMaxBlocks blocks covers any count (a tensor of 2^31 or more elements included).
struct Grid {
    uint32_t blocks = 1, threads = 1, jobs = 1;
    uint64_t items = 0;
};
constexpr uint32_t kThreadsPerBlock = 256;
constexpr uint32_t kMaxBlocks = 65536;  // 16.7 M threads: every SM of a large GPU full many times over

inline Grid grid_for(uint64_t items, uint32_t jobs = 1) {
    Grid g;
    g.items = items;
    g.threads = kThreadsPerBlock;
    const uint64_t blocks = (items + g.threads - 1) / g.threads;
    g.blocks = uint32_t(blocks < 1 ? 1 : blocks > kMaxBlocks ? kMaxBlocks : blocks);
    g.jobs = jobs;
    return g;
}
DP_HD uint64_t first_item(const Grid& g, uint32_t block, uint32_t thread) { return uint64_t(block) * g.threads + thread; }
DP_HD uint64_t item_stride(const Grid& g) { return uint64_t(g.blocks) * g.threads; }

// The grid-stride loop every kernel runs: body(job, item) for this thread's items.
template <class Body>
DP_HD void run_items(const Body& body, const Grid& g, uint32_t job, uint32_t block, uint32_t thread) {
    for (uint64_t i = first_item(g, block, thread); i < g.items; i += item_stride(g)) body(job, i);
}

// First failure wins: the lowest index reported to a slot (initialised to ~0).
DP_HD void report_index(unsigned long long* slot, uint64_t index) {
#if defined(__CUDA_ARCH__)
    atomicMin(slot, (unsigned long long)index);
#else
    if (index < *slot) *slot = index;  // the emulation runs one thread at a time
#endif
}

// ------------------------------------------------------------------------------------------ decoding

// Element (r, c) of the delta as f32, for every codec but sparse (whose values need the row walked: SparseRow).
DP_HD float lowrank_u(const DeltaView& v, int64_t r, int64_t k);
DP_HD float lowrank_v(const DeltaView& v, int64_t k, int64_t c);

// Sign: the scale of row r's span g (the tensor's, the row's, or group g's).
DP_HD float scale_of_span(const DeltaView& v, int64_t r, int64_t g) {
    const auto* scales = static_cast<const float*>(v.part[1]);
    return v.scope == 0 ? scales[0] : v.scope == 1 ? scales[r] : scales[r * v.ngroups + g];
}

DP_HD float delta_element(const DeltaView& v, int64_t r, int64_t c) {
    switch (v.kind) {
        case DeltaView::Sign: {  // bit ? s : -s, s the scale of the row's span
            const auto* signs = static_cast<const uint8_t*>(v.part[0]);
            const float s = scale_of_span(v, r, v.scope == 2 ? c / v.group : 0);
            return bit_at(signs + r * v.row_bytes, uint64_t(c)) ? s : -s;
        }
        case DeltaView::Levels: {  // (sign bit ? 1 : -1) * table[code]
            const auto* signs = static_cast<const uint8_t*>(v.part[0]);
            const auto* table = static_cast<const float*>(v.part[1]);
            const auto* codes = static_cast<const uint8_t*>(v.part[2]);
            const float m = table[v.bits ? read_code(codes + r * v.code_bytes, v.bits, size_t(c)) : 0];
            return bit_at(signs + r * v.row_bytes, uint64_t(c)) ? m : -m;
        }
        case DeltaView::Quant: {  // (code - qmax) * f16 scale * 2^scale_exp
            const auto* codes = static_cast<const uint8_t*>(v.part[0]);
            const auto* scales = static_cast<const uint16_t*>(v.part[1]);
            const float qmax = float((1 << (v.bits - 1)) - 1);
            const float s = scale_by_pow2(f16_to_f32(scales[r * v.ngroups + c / v.group]), v.scale_exp);
            return (float(read_code(codes + r * v.row_bytes, v.bits, size_t(c))) - qmax) * s;
        }
        case DeltaView::Dense: return load_one(v.part[0], v.dtype, size_t(r * v.cols + c));
        case DeltaView::Lowrank:
        case DeltaView::LowrankQuant: {  // sum over k of u[r, k] * v[k, c], k in order, from +0
            float acc = 0.0f;
            for (int64_t k = 0; k < v.rank; ++k) acc = acc + lowrank_u(v, r, k) * lowrank_v(v, k, c);
            return acc;
        }
        default: return 0.0f;  // sparse: not element-wise
    }
}

// A quantized direction k: where its codes and scales lie, and its width.
struct QuantDirection {
    const uint8_t* u_codes;
    const uint8_t* v_codes;
    const uint16_t* u_scales;
    const uint16_t* v_scales;
    int bits;
    DP_HD float offset() const { return float((1 << bits) - 1) * 0.5f; }
};

DP_HD QuantDirection quant_direction(const DeltaView& v, int64_t k) {
    const int64_t ugroups = (v.rows + v.group - 1) / v.group, vgroups = (v.cols + v.group - 1) / v.group;
    int64_t at = 0, first = 0;
    int b = 0;
    for (; b + 1 < v.nbands && k >= first + v.band_size[b]; ++b) {
        at += v.band_size[b] * (packed_row_bytes(v.rows, v.band_bits[b]) + packed_row_bytes(v.cols, v.band_bits[b]));
        first += v.band_size[b];
    }
    const int w = v.band_bits[b];
    const int64_t ub = packed_row_bytes(v.rows, w), vb = packed_row_bytes(v.cols, w);
    at += (k - first) * (ub + vb);
    const auto* codes = static_cast<const uint8_t*>(v.part[0]);
    const auto* scales = static_cast<const uint16_t*>(v.part[1]) + k * (ugroups + vgroups);
    return QuantDirection{codes + at, codes + at + ub, scales, scales + ugroups, w};
}

DP_HD float lowrank_u(const DeltaView& v, int64_t r, int64_t k) {
    if (v.kind == DeltaView::Lowrank) return load_one(v.part[0], v.dtype, size_t(r * v.rank + k));
    const QuantDirection q = quant_direction(v, k);  // (code - offset) * scale, times the singular value
    const float u = (float(read_code(q.u_codes, q.bits, size_t(r))) - q.offset()) * f16_to_f32(q.u_scales[r / v.group]);
    return u * static_cast<const float*>(v.part[2])[k];
}

DP_HD float lowrank_v(const DeltaView& v, int64_t k, int64_t c) {
    if (v.kind == DeltaView::Lowrank) return load_one(v.part[1], v.dtype, size_t(k * v.cols + c));
    const QuantDirection q = quant_direction(v, k);
    return (float(read_code(q.v_codes, q.bits, size_t(c))) - q.offset()) * f16_to_f32(q.v_scales[c / v.group]);
}

// One sparse row's values column by column (0 where nothing is stored), in the CPU's order of entries.
struct SparseRow {
    const DeltaView* v;
    const uint8_t* index;  // the row's mask bytes, or its gaps
    int64_t entry, end;    // the next entry, and the row's end
    int64_t next_col;      // gaps: the column of the next entry
    float vscale;
    DP_HD SparseRow() : v(nullptr), index(nullptr), entry(0), end(0), next_col(-1), vscale(1.0f) {}
    DP_HD SparseRow(const DeltaView& view, int64_t r) : v(&view) {
        const auto* rowptr = static_cast<const int64_t*>(view.part[0]);
        entry = rowptr[r], end = rowptr[r + 1];
        vscale = view.part[3] ? static_cast<const float*>(view.part[3])[r] : 1.0f;
        const auto* idx = static_cast<const uint8_t*>(view.part[1]);
        index = view.kind == DeltaView::SparseBitmap ? idx + r * view.row_bytes : idx;
        next_col = view.kind == DeltaView::SparseGaps && entry < end ? int64_t(index[entry]) : -1;
    }
    // The value of column c; called for c = 0, 1, ... in order.
    DP_HD float at(int64_t c) {
        if (v->kind == DeltaView::SparseBitmap) {
            if (!bit_at(index, uint64_t(c))) return 0.0f;
            return sparse_value(v->part[2], v->dtype, size_t(entry++), vscale);
        }
        if (c != next_col) return 0.0f;
        const float x = sparse_value(v->part[2], v->dtype, size_t(entry++), vscale);
        next_col = entry < end ? c + 1 + int64_t(index[entry]) : -1;
        return x;  // a +0 filler is the 0 of an empty column
    }
};

DP_HD bool is_sparse(const DeltaView& v) { return v.kind == DeltaView::SparseBitmap || v.kind == DeltaView::SparseGaps; }

// ------------------------------------------------------------------------------------------ apply and decode

// out = round(base + alpha * delta) over a whole tensor: base and out device arrays of the delta's shape (out may
// be base). errors[0]: the lowest flat index where |alpha * d| exceeds kMaxStep; errors[1]: the lowest where an
// f16 output became infinite from a finite base. The rounding is dithered (by the flat index) when `dither`.
struct ApplyArgs {
    DeltaView v;
    const void* base;
    void* out;
    DType base_dtype, out_dtype;
    float alpha;
    bool dither;
    bool aligned_runs;  // cols % 8 == 0 and base, out 16-byte aligned: runs move in 16-byte loads and stores
    unsigned long long* errors;
};

// Element i's output bits (f32, or f16/bf16 in the low 16 bits) from its base value b and delta value d, with the
// CPU engine's arithmetic; the failures reported as it finds them.
DP_HD uint32_t rebuilt_bits(const ApplyArgs& a, uint64_t i, float b, float d) {
    bool ok = true;
    const float s = rebuild_sum(b, a.alpha, d, ok);
    if (!ok) report_index(a.errors, i);
    uint32_t o;
    if (a.out_dtype == DType::F32) o = f32_to_bits(s);
    else if (a.dither) o = a.out_dtype == DType::BF16 ? f32_to_bf16_dithered(s, dither_bits(i)) : f32_to_f16_dithered(s, dither_bits(i));
    else o = a.out_dtype == DType::BF16 ? f32_to_bf16(s) : f32_to_f16(s);
    if (a.out_dtype == DType::F16 && a.alpha * d != 0.0f && is_finite_f32(b) && (o & 0x7c00u) == 0x7c00u)
        report_index(a.errors + 1, i);
    return o;
}

DP_HD void finish_element(const ApplyArgs& a, uint64_t i, float d) {
    const uint32_t o = rebuilt_bits(a, i, load_one(a.base, a.base_dtype, size_t(i)), d);
    if (a.out_dtype == DType::F32) static_cast<uint32_t*>(a.out)[i] = o;
    else static_cast<uint16_t*>(a.out)[i] = uint16_t(o);
}

// Element-wise kernels take a run of kRun consecutive columns of one row per item (one byte of sign bits; one
// 64-bit division per run, not per element: the GPU emulates it in tens of instructions).
constexpr int64_t kRun = 8;
DP_HD uint64_t runs_of(const DeltaView& v) { return uint64_t(v.rows) * uint64_t((v.cols + kRun - 1) / kRun); }
// Run `item`'s row r and first column c0.
DP_HD void run_at(const DeltaView& v, uint64_t item, int64_t& r, int64_t& c0) {
    const uint64_t per_row = uint64_t((v.cols + kRun - 1) / kRun);
    r = int64_t(item / per_row), c0 = int64_t(item % per_row) * kRun;
}
template <class F>
DP_HD void for_run(const DeltaView& v, uint64_t item, F f) {
    int64_t r, c0;
    run_at(v, item, r, c0);
    const int64_t c1 = c0 + kRun < v.cols ? c0 + kRun : v.cols;
    for (int64_t c = c0; c < c1; ++c) f(r, c, uint64_t(r) * uint64_t(v.cols) + uint64_t(c));
}

// 16 bytes at once: one load or store instruction per thread on the GPU, so that a warp's accesses are whole
// consecutive lines (element by element, each of 8 stores would write a 2-byte piece of 16 lines). Both addresses
// 16-byte aligned (local arrays too: alignas(16)), as the GPU requires of a 16-byte access.
DP_HD void copy16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
    *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
#else
    // The emulation holds the device to its rule: a misaligned 16-byte access is a fault there.
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16)
        throw std::logic_error("a 16-byte access at an address that is not 16-byte aligned (a fault on a GPU)");
    std::memcpy(dst, src, 16);
#endif
}
// The kRun elements from element i0 of a 16-byte aligned array of dtype t, as bits (f32, or f16/bf16 in the low 16).
DP_HD void load_run(const void* p, DType t, uint64_t i0, uint32_t* bits) {
    if (t == DType::F32) {
        copy16(bits, static_cast<const uint32_t*>(p) + i0);
        copy16(bits + 4, static_cast<const uint32_t*>(p) + i0 + 4);
        return;
    }
    alignas(16) uint16_t half[kRun];
    copy16(half, static_cast<const uint16_t*>(p) + i0);
    for (int k = 0; k < kRun; ++k) bits[k] = half[k];
}
DP_HD void store_run(void* p, DType t, uint64_t i0, const uint32_t* bits) {
    if (t == DType::F32) {
        copy16(static_cast<uint32_t*>(p) + i0, bits);
        copy16(static_cast<uint32_t*>(p) + i0 + 4, bits + 4);
        return;
    }
    alignas(16) uint16_t half[kRun];
    for (int k = 0; k < kRun; ++k) half[k] = uint16_t(bits[k]);
    copy16(static_cast<uint16_t*>(p) + i0, half);
}
DP_HD float value_of(uint32_t bits, DType t) {
    return t == DType::F32 ? bits_to_f32(bits) : t == DType::F16 ? f16_to_f32(uint16_t(bits)) : bf16_to_f32(uint16_t(bits));
}

// Item: a run of columns (every codec but sparse).
struct ApplyElements {
    ApplyArgs a;
    DP_HD void operator()(uint32_t, uint64_t item) const {
        if (!a.aligned_runs) {
            for_run(a.v, item, [this](int64_t r, int64_t c, uint64_t i) { finish_element(a, i, delta_element(a.v, r, c)); });
            return;
        }
        int64_t r, c0;  // a whole run
        run_at(a.v, item, r, c0);
        const uint64_t i0 = uint64_t(r) * uint64_t(a.v.cols) + uint64_t(c0);
        alignas(16) uint32_t bits[kRun];  // whole 16-byte pieces (copy16)
        load_run(a.base, a.base_dtype, i0, bits);
        for (int k = 0; k < kRun; ++k)
            bits[k] = rebuilt_bits(a, i0 + uint64_t(k), value_of(bits[k], a.base_dtype), delta_element(a.v, r, c0 + k));
        store_run(a.out, a.out_dtype, i0, bits);
    }
};

// Item: a row (sparse: the row is walked in order; each element is still read and written by this thread only).
struct ApplySparseRows {
    ApplyArgs a;
    DP_HD void operator()(uint32_t, uint64_t r) const {
        SparseRow row(a.v, int64_t(r));
        for (int64_t c = 0; c < a.v.cols; ++c) finish_element(a, r * uint64_t(a.v.cols) + uint64_t(c), row.at(c));
    }
};

// decode: out (f32, rows x cols) = the delta.
struct DecodeElements {
    DeltaView v;
    float* out;
    bool aligned_runs;  // cols % 8 == 0 and out 16-byte aligned
    DP_HD void operator()(uint32_t, uint64_t item) const {
        if (!aligned_runs) {
            for_run(v, item, [this](int64_t r, int64_t c, uint64_t i) { out[i] = delta_element(v, r, c); });
            return;
        }
        int64_t r, c0;  // a whole run
        run_at(v, item, r, c0);
        alignas(16) uint32_t bits[kRun];  // whole 16-byte pieces (copy16)
        for (int k = 0; k < kRun; ++k) bits[k] = f32_to_bits(delta_element(v, r, c0 + k));
        store_run(out, DType::F32, uint64_t(r) * uint64_t(v.cols) + uint64_t(c0), bits);
    }
};

// Whether an element-wise kernel over a delta of `cols` columns may move whole runs in 16-byte pieces.
inline bool runs_align(int64_t cols, const void* a, const void* b) {
    return cols % kRun == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
}
struct DecodeSparseRows {
    DeltaView v;
    float* out;
    DP_HD void operator()(uint32_t, uint64_t r) const {
        SparseRow row(v, int64_t(r));
        for (int64_t c = 0; c < v.cols; ++c) out[r * uint64_t(v.cols) + uint64_t(c)] = row.at(c);
    }
};

// ------------------------------------------------------------------------------------------ batch products

// One job of a mixed batch: y[b * rows + r] += alpha * (delta row r . x[b * cols ...]) for b < batch, as
// delta_products on the CPU computes it (the same bits, so a GPU bank serves exactly what a CPU bank does).
// scratch: the job's share of the caller's workspace (product_scratch_floats), filled by the lowrank prepass.
struct ProductJobArgs {
    DeltaView v;
    const float* x;
    float* y;
    int64_t batch;
    float* scratch;
};
constexpr int kMaxProductJobs = 16;  // fine-tunes in one launch (kernel parameters hold them by value)
struct ProductArgs {
    ProductJobArgs job[kMaxProductJobs];
    int jobs;
    float alpha;
};

DP_HD bool is_lowrank(const DeltaView& v) { return v.kind == DeltaView::Lowrank || v.kind == DeltaView::LowrankQuant; }

// Sign: a scale's span is whole groups of 4 columns (the group size is a multiple of 8).
DP_HD int64_t sign_span_groups(const DeltaView& v) {
    const int64_t cols = v.scope == 2 ? v.group : v.cols;
    return (cols + 3) / 4 > 1 ? (cols + 3) / 4 : 1;
}
DP_HD int64_t sign_spans(const DeltaView& v) {
    return v.cols ? ((v.cols + 3) / 4 + sign_span_groups(v) - 1) / sign_span_groups(v) : 1;
}

// Workspace floats a job needs: lowrank, v x_b per direction in Kernels::dots' 16 lanes, then folded ([direction]
// [batch row][16], then [direction][batch row]); other codecs none.
DP_HD int64_t product_scratch_floats(const DeltaView& v, int64_t batch) {
    return is_lowrank(v) ? v.rank * batch * 17 : 0;
}
DP_HD const float* lowrank_vx(const ProductJobArgs& job) { return job.scratch + job.v.rank * job.batch * 16; }

// Lowrank prepass, item (job, s) with s = (d * batch + b) * 16 + lane: lane `lane` of v_d . x_b, the products of
// the columns c = lane (mod 16) added in order from +0 (one lane of Kernels::dots).
struct LowrankLanes {
    ProductArgs p;
    DP_HD void operator()(uint32_t j, uint64_t s) const {
        const ProductJobArgs& job = p.job[j];
        const DeltaView& v = job.v;
        if (!is_lowrank(v) || int64_t(s) >= v.rank * job.batch * 16) return;
        const int64_t lane = int64_t(s % 16), b = int64_t(s / 16) % job.batch, d = int64_t(s / 16) / job.batch;
        const float* x = job.x + b * v.cols;
        float acc = 0.0f;
        for (int64_t c = lane; c < v.cols; c += 16) acc = acc + lowrank_v(v, d, c) * x[c];
        job.scratch[s] = acc;
    }
};
// Item (job, t) with t = d * batch + b: the 16 lanes folded as Kernels::dots folds them (+8, +4, +2, +1).
struct LowrankFold {
    ProductArgs p;
    DP_HD void operator()(uint32_t j, uint64_t t) const {
        const ProductJobArgs& job = p.job[j];
        if (!is_lowrank(job.v) || int64_t(t) >= job.v.rank * job.batch) return;
        float lanes[16];
        for (int l = 0; l < 16; ++l) lanes[l] = job.scratch[t * 16 + uint64_t(l)];
        job.scratch[job.v.rank * job.batch * 16 + int64_t(t)] = fold_16_lanes(lanes);
    }
};

// Item (job, (chunk, r)): row r's products with kChunk batch rows of the job (chunk c: rows kChunk c ..), added to y.
// Consecutive threads take consecutive rows of one chunk, so they read the same x values at once.
struct ProductRows {
    ProductArgs p;
    static constexpr int kChunk = 4;  // batch rows per pass over the delta row (registers)
    DP_HD static int64_t chunks(int64_t batch) { return (batch + kChunk - 1) / kChunk; }
    DP_HD void operator()(uint32_t j, uint64_t item) const {
        const ProductJobArgs& job = p.job[j];
        const DeltaView& v = job.v;
        const int64_t r = int64_t(item % uint64_t(v.rows)), b0 = int64_t(item / uint64_t(v.rows)) * kChunk;
        if (b0 >= job.batch) return;
        const int nb = int(job.batch - b0 < kChunk ? job.batch - b0 : kChunk);
        float acc[kChunk] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (v.kind == DeltaView::Sign) sign_row(job, r, b0, nb, acc);
        else if (is_lowrank(v)) lowrank_row(job, r, b0, nb, acc);
        else decoded_row(job, r, b0, nb, acc);
        for (int b = 0; b < nb; ++b) {
            float& out = job.y[(b0 + b) * v.rows + r];
            out = out + p.alpha * acc[b];
        }
    }
    // Sign: for each span, s * (2 * (sum of x over the set bits) - (sum of x over the span)), spans in order; both
    // sums as table_sums adds them, group after group from +0 (the span's sum beside the row's: independent adds
    // that cost a latency-bound thread little, and no pass over x before).
    DP_HD static void sign_row(const ProductJobArgs& job, int64_t r, int64_t b0, int nb, float* acc) {
        const DeltaView& v = job.v;
        const auto* bits = static_cast<const uint8_t*>(v.part[0]) + r * v.row_bytes;
        const int64_t per = sign_span_groups(v), groups = (v.cols + 3) / 4, spans = sign_spans(v);
        for (int64_t g = 0; g < spans; ++g) {
            float set[kChunk] = {0.0f, 0.0f, 0.0f, 0.0f}, all[kChunk] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t q = g * per; q < groups && q < (g + 1) * per; ++q) {
                const unsigned m = (bits[q >> 1] >> ((q & 1) * 4)) & 15u;
                for (int b = 0; b < nb; ++b) {
                    const float* x = job.x + (b0 + b) * v.cols;
                    set[b] = set[b] + group_sum(x, v.cols, q, m);
                    all[b] = all[b] + group_sum(x, v.cols, q, 15u);
                }
            }
            const float s = scale_of_span(v, r, g);
            for (int b = 0; b < nb; ++b) acc[b] = acc[b] + s * (2.0f * set[b] - all[b]);
        }
    }
    // Lowrank: u[r] . (v x_b), directions in order.
    DP_HD static void lowrank_row(const ProductJobArgs& job, int64_t r, int64_t b0, int nb, float* acc) {
        const float* vx = lowrank_vx(job);
        for (int64_t d = 0; d < job.v.rank; ++d) {
            const float u = lowrank_u(job.v, r, d);
            for (int b = 0; b < nb; ++b) acc[b] = acc[b] + u * vx[d * job.batch + b0 + b];
        }
    }
    // Other codecs: the decoded row's dot with x_b in Kernels::dots' 16-lane order.
    DP_HD static void decoded_row(const ProductJobArgs& job, int64_t r, int64_t b0, int nb, float* acc) {
        const DeltaView& v = job.v;
        float lanes[kChunk][16];
        for (int b = 0; b < kChunk; ++b)
            for (int l = 0; l < 16; ++l) lanes[b][l] = 0.0f;
        SparseRow row = is_sparse(v) ? SparseRow(v, r) : SparseRow();
        for (int64_t c = 0; c < v.cols; ++c) {
            const float d = is_sparse(v) ? row.at(c) : delta_element(v, r, c);
            for (int b = 0; b < nb; ++b) lanes[b][c & 15] = lanes[b][c & 15] + d * job.x[(b0 + b) * v.cols + c];
        }
        for (int b = 0; b < nb; ++b) acc[b] = fold_16_lanes(lanes[b]);
    }
};

// ------------------------------------------------------------------------------------------ launches

// Which kernels a call runs, over which grids: one plan for the GPU (cuda/device.cu) and its host emulation
// (cuda/emulate.cpp). launch(body, grid) runs `body` over the grid; a grid of no items is not launched.
template <class Launch>
void plan_apply(const ApplyArgs& a, Launch launch) {
    const uint64_t rows = uint64_t(a.v.rows), cols = uint64_t(a.v.cols);
    if (is_sparse(a.v)) launch(ApplySparseRows{a}, grid_for(rows * (cols ? 1 : 0)));
    else launch(ApplyElements{a}, grid_for(runs_of(a.v)));
}
template <class Launch>
void plan_decode(const DeltaView& v, float* out, Launch launch) {
    const uint64_t rows = uint64_t(v.rows), cols = uint64_t(v.cols);
    if (is_sparse(v)) launch(DecodeSparseRows{v, out}, grid_for(rows * (cols ? 1 : 0)));
    else launch(DecodeElements{v, out, runs_align(v.cols, out, out)}, grid_for(runs_of(v)));
}
// All jobs share the delta's shape. Lowrank jobs first compute v x (16 lanes, then folded); every job's rows
// then run in one launch.
template <class Launch>
void plan_products(const ProductArgs& p, Launch launch) {
    if (p.jobs == 0 || p.job[0].v.rows == 0) return;
    int64_t vx = 0, chunks = 0;
    for (int j = 0; j < p.jobs; ++j) {
        const ProductJobArgs& job = p.job[j];
        if (is_lowrank(job.v) && job.v.rank * job.batch > vx) vx = job.v.rank * job.batch;
        chunks = ProductRows::chunks(job.batch) > chunks ? ProductRows::chunks(job.batch) : chunks;
    }
    if (vx) {
        launch(LowrankLanes{p}, grid_for(uint64_t(vx) * 16, uint32_t(p.jobs)));
        launch(LowrankFold{p}, grid_for(uint64_t(vx), uint32_t(p.jobs)));
    }
    launch(ProductRows{p}, grid_for(uint64_t(chunks) * uint64_t(p.job[0].v.rows), uint32_t(p.jobs)));
}

}  // namespace deltapack::cuda
