// Compares every kernel of every SIMD path this CPU runs against the scalar path, bit for bit,
// on random data with awkward lengths and special values, and every path on a row wider than 2^31
// columns. Exit status 0 = all identical.
// Built and run by tests/test_kernels_native.py (natively, and for AArch64 under qemu-user).
#include <sys/mman.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"

using namespace deltapack;

static int failures = 0;
static std::mt19937_64 rng(1234);

static void check(bool ok, const char* path, const char* what, size_t n) {
    if (!ok && failures++ < 20) std::printf("MISMATCH %s %s n=%zu\n", path, what, n);
}

static std::vector<float> random_floats(size_t n, bool special) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_int_distribution<int> ex(-30, 10);
    std::vector<float> v(n);
    const float specials[] = {0.0f, -0.0f, 1e-40f, -3e-39f, 65504.0f, 65520.0f, 1e30f, 6.1e-5f, 5.9e-8f};
    for (size_t i = 0; i < n; ++i) {
        v[i] = std::ldexp(nd(rng), ex(rng));
        if (special && i % 7 == 3) v[i] = specials[(i / 7) % 9];
    }
    return v;
}

template <class T>
static bool same(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

static std::vector<uint8_t> random_bytes(size_t n) {
    std::vector<uint8_t> b(n);
    for (auto& x : b) x = uint8_t(rng());
    return b;
}

static void check_path(const Kernels& k) {
    const Kernels& s = kScalarKernels;
    const DType fts[] = {DType::F32, DType::F16, DType::BF16};
    for (size_t n : {size_t(0), size_t(1), size_t(7), size_t(16), size_t(31), size_t(33), size_t(100), size_t(257), size_t(1000)}) {
        auto x = random_floats(n, true);
        // Inputs of each dtype.
        for (DType t : fts) {
            std::vector<uint8_t> src(n * dtype_size(t) + 1);
            for (size_t i = 0; i < n; ++i) store_one(src.data(), t, i, x[i]);
            std::vector<float> a(n), b(n);
            s.to_f32(src.data(), t, a.data(), n);
            k.to_f32(src.data(), t, b.data(), n);
            check(same(a, b), k.name, "to_f32", n);
            auto d = random_floats(n, false);
            // Where the range check of alpha * d must fail: one infinity, NaN or value past kMaxStep anywhere.
            const float bad_values[] = {0.0f, INFINITY, NAN, 3e38f};
            for (float bad : bad_values) {
                auto dd = d;
                if (bad != 0.0f && n) dd[rng() % n] = bad;
                for (DType ot : fts)
                    for (float alpha : {1.0f, 0.37f, -2.0f})
                        for (bool stream : {false, true}) {
                            std::vector<uint8_t> o1(n * dtype_size(ot) + 64), o2(o1.size());
                            bool ok1 = s.add_round(src.data(), t, dd.data(), alpha, o1.data(), ot, n, stream);
                            bool ok2 = k.add_round(src.data(), t, dd.data(), alpha, o2.data(), ot, n, stream);
                            if (stream) store_fence();
                            check(same(o1, o2) || bad != 0.0f, k.name, "add_round", n);
                            const bool expect = bad == 0.0f || n == 0;  // 3e38 x {1, 0.37, -2} > kMaxStep
                            check(ok1 == expect && ok2 == expect, k.name, "add_round range check", n);
                        }
            }
        }
        auto bits = random_bytes((n + 7) / 8 + 16);
        {
            std::vector<float> a(n), b(n);
            s.sign_expand(bits.data(), n, 0.25f, a.data());
            k.sign_expand(bits.data(), n, 0.25f, b.data());
            check(same(a, b), k.name, "sign_expand", n);
            // The fused rebuild against the scalar one and against sign_expand + add_round, every dtype pair,
            // outputs at several offsets from a 64-byte line (the streamed head), streamed or not.
            const float t = -0.0123f;
            std::vector<float> pm(n);
            s.sign_expand(bits.data(), n, t, pm.data());
            for (DType bt : fts)
                for (DType ot : fts)
                    for (size_t at : {size_t(0), size_t(1), size_t(18)})  // elements (a dtype's own alignment)
                        for (bool stream : {false, true}) {
                            const size_t off = at * dtype_size(ot);
                            std::vector<uint8_t> src(n * dtype_size(bt) + 64);
                            for (size_t i = 0; i < n; ++i) store_one(src.data(), bt, i, x[i]);
                            std::vector<uint8_t> o1((n + 18) * dtype_size(ot) + 64), o2(o1.size()), o3(o1.size());
                            s.sign_add_round(bits.data(), t, src.data(), bt, o1.data() + off, ot, n, stream);
                            k.sign_add_round(bits.data(), t, src.data(), bt, o2.data() + off, ot, n, stream);
                            k.add_round(src.data(), bt, pm.data(), 1.0f, o3.data() + off, ot, n, stream);
                            if (stream) store_fence();
                            check(same(o1, o2) && same(o1, o3), k.name, "sign_add_round", n);
                        }
            std::vector<uint8_t> p1((n + 7) / 8), p2((n + 7) / 8);
            s.pack_signs(x.data(), n, p1.data());
            k.pack_signs(x.data(), n, p2.data());
            check(same(p1, p2), k.name, "pack_signs", n);
            auto y = random_floats(n, false);
            double s1 = s.abs_sum(y.data(), n), s2 = k.abs_sum(y.data(), n);
            check(std::memcmp(&s1, &s2, 8) == 0, k.name, "abs_sum", n);
        }
        for (int w = 1; w <= 8; ++w) {
            auto codes = random_bytes((n * size_t(w) + 7) / 8 + 16);
            std::vector<float> a(n), b(n);
            s.unpack_codes(codes.data(), w, n, 7.0f, 0.125f, a.data());
            k.unpack_codes(codes.data(), w, n, 7.0f, 0.125f, b.data());
            check(same(a, b), k.name, "unpack_codes", n);
            float table[256];
            for (int i = 0; i < 256; ++i) table[i] = float(i) * 0.01f;
            s.levels_expand(bits.data(), codes.data(), w - 1, n, table, a.data());
            k.levels_expand(bits.data(), codes.data(), w - 1, n, table, b.data());
            check(same(a, b), k.name, "levels_expand", n);
        }
        for (DType vt : {DType::F32, DType::F16, DType::BF16, DType::I8}) {
            std::vector<uint8_t> vals(n * 4 + 8);
            for (size_t i = 0; i < n; ++i) {
                if (vt == DType::I8) vals[i] = uint8_t(rng());
                else store_one(vals.data(), vt, i, x[i]);
            }
            std::vector<float> a(n), b(n);
            s.sparse_expand(bits.data(), vals.data(), vt, 0.5f, n, a.data());
            k.sparse_expand(bits.data(), vals.data(), vt, 0.5f, n, b.data());
            check(same(a, b), k.name, "sparse_expand", n);
        }
        {  // a valid byte-gap index over n columns (every column < n)
            std::vector<uint8_t> gaps;
            std::vector<float> vals;
            for (size_t c = 0; n && c + 1 < n && gaps.size() < n;) {
                size_t g = size_t(rng() % 6 == 0 ? rng() % 256 : rng() % 4);
                if (c + g + 1 >= n) break;
                c += g + 1;
                gaps.push_back(uint8_t(g));
                const int kind = int(rng() % 9);  // some +0 (not written: the row is zeroed) and -0 (written)
                vals.push_back(kind == 0 ? 0.0f : kind == 1 ? -0.0f : float(c) * 0.5f);
            }
            if (!gaps.empty()) gaps[0] = 0;  // first entry at column 0
            std::vector<float> a(n, 1.0f), b(n, 2.0f);
            s.gaps_scatter(gaps.data(), vals.data(), gaps.size(), a.data(), n);
            k.gaps_scatter(gaps.data(), vals.data(), gaps.size(), b.data(), n);
            check(same(a, b), k.name, "gaps_scatter", n);
        }
        check(s.sum_bytes(bits.data(), bits.size()) == k.sum_bytes(bits.data(), bits.size()), k.name, "sum_bytes", n);
        check(s.popcount_bytes(bits.data(), bits.size()) == k.popcount_bytes(bits.data(), bits.size()), k.name,
              "popcount_bytes", n);
        {
            auto a = random_floats(n, false), b = a;
            s.scale(a.data(), n, 0.3f);
            k.scale(b.data(), n, 0.3f);
            check(same(a, b), k.name, "scale", n);
        }
        for (int r : {1, 3, 8}) {
            for (int nr : {1, 4, 5}) {
                auto U = random_floats(size_t(nr * r), false), V = random_floats(size_t(r) * n, false);
                std::vector<float> a(size_t(nr) * n), b(a.size());
                s.lowrank_rows(U.data(), V.data(), r, n, nr, a.data());
                k.lowrank_rows(U.data(), V.data(), r, n, nr, b.data());
                check(same(a, b), k.name, "lowrank_rows", n);
            }
        }
        // Batch products over every block shape (rows x batch rows) the paths use, rows and x with padding.
        for (int nr : {1, 2, 3, 4, 5, 9}) {
            for (int nx : {1, 2, 3, 4, 5, 9}) {
                const size_t astride = n + 5, ldx = n + 3;
                auto a = random_floats(astride * size_t(nr), false), x = random_floats(ldx * size_t(nx), true);
                std::vector<float> o1(size_t(nr * nx)), o2(o1.size());
                s.dots(a.data(), astride, nr, x.data(), ldx, nx, n, o1.data());
                k.dots(a.data(), astride, nr, x.data(), ldx, nx, n, o2.data());
                check(same(o1, o2), k.name, "dots", n);
            }
        }
        // Sign tables and table sums: rows in and around the 16- and 64-row register blocks, batch rows in and
        // around blocks of 4, spans of 2 groups up to one span for the row, the bits of each row followed by
        // other bytes (which must not count).
        for (int nx : {1, 2, 3, 4, 5, 9}) {
            const size_t ldx = n + 3, groups = (n + 3) / 4;
            auto x = random_floats(ldx * size_t(nx), true);
            std::vector<float> t1(groups * size_t(nx) * 16), t2(t1.size());
            s.sign_tables(x.data(), ldx, nx, n, t1.data());
            k.sign_tables(x.data(), ldx, nx, n, t2.data());
            check(same(t1, t2), k.name, "sign_tables", n);
            for (size_t span_groups : {size_t(2), size_t(8), size_t(32), std::max<size_t>(groups, 1)}) {
                for (int nr : {1, 5, 13, 16, 17, 29, 40, 64, 65, 111, 130}) {
                    const size_t bstride = (n + 7) / 8 + 3;
                    auto bits = random_bytes(bstride * size_t(nr) + 2);
                    std::vector<float> o1(size_t(nr) * table_spans(n, span_groups) * size_t(nx)), o2(o1.size());
                    s.table_sums(bits.data(), bstride, nr, t1.data(), nx, n, span_groups, o1.data());
                    k.table_sums(bits.data(), bstride, nr, t1.data(), nx, n, span_groups, o2.data());
                    check(same(o1, o2), k.name, "table_sums", n);
                }
            }
        }
    }
}

// A row wider than 2^31 columns: no path may hold a column in 32 bits. The row is an untouched
// MAP_NORESERVE reservation and cols = 0 (no zeroing); fillers are +0 and not written, so only the entries
// around column 2^31 touch memory.
static void check_wide_row(const Kernels& k) {
    const size_t start = (size_t(1) << 31) - 1000, cols = start + 6000;
    void* mem = mmap(nullptr, cols * sizeof(float), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        std::printf("note: no %zu-byte reservation, wide-row check of %s skipped\n", cols * sizeof(float), k.name);
        return;
    }
    float* row = static_cast<float*>(mem);
    std::vector<uint8_t> gaps;
    std::vector<float> vals;
    std::vector<size_t> where;
    size_t next = 0;  // the column after the previous entry
    for (; start - next > 255; next += 256) gaps.push_back(255), vals.push_back(0.0f);
    for (size_t c = start; c < cols - 300; c = next + size_t(rng() % 40)) {
        gaps.push_back(uint8_t(c - next));
        vals.push_back(float(where.size() + 1));
        where.push_back(c);
        next = c + 1;
    }
    k.gaps_scatter(gaps.data(), vals.data(), gaps.size(), row, 0);
    size_t nonzero = 0;
    for (size_t c = start - 4096; c < cols; ++c) nonzero += row[c] != 0.0f;
    bool ok = nonzero == where.size();
    for (size_t i = 0; i < where.size(); ++i) ok = ok && row[where[i]] == float(i + 1);
    check(ok && where.back() > (size_t(1) << 31), k.name, "gaps_scatter past column 2^31", cols);
    munmap(mem, cols * sizeof(float));
}

int main() {
    for (const std::string& path : simd_available()) {
        set_simd(path);
        check_wide_row(kernels());
        if (path == "scalar") continue;
        check_path(kernels());
        std::printf("checked %s against scalar\n", path.c_str());
    }
    std::printf(failures ? "%d mismatches\n" : "all kernels identical\n", failures);
    return failures ? 1 : 0;
}
