// Single-thread sign products, 4096 x 4096, 1, 4 and 16 batch rows, everything in cache, best of 20:
// the kernel (table_sums in 64-row calls, as delta_products hands them out) on every SIMD path this machine
// has, then deltapack::delta_product of a `sign` delta per scale scope on the active path.
//     cmake -S . -B build -DDELTAPACK_TESTS=ON && cmake --build build --target kernel_bench && build/kernel_bench
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "deltapack/deltapack.h"
#include "kernels.h"

using namespace deltapack;

int main() {
    const size_t rows = 4096, cols = 4096, row_bytes = cols / 8;
    std::mt19937 rng(1);
    std::vector<uint8_t> bits(rows * row_bytes);
    for (auto& b : bits) b = uint8_t(rng());
    std::vector<const Kernels*> paths = {&kScalarKernels};
#ifdef DELTAPACK_X86
    if (__builtin_cpu_supports("avx2")) paths.push_back(&kAvx2Kernels);
    if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) paths.push_back(&kAvx512Kernels);
#endif
#ifdef DELTAPACK_ARM
    paths.push_back(&kNeonKernels);
#endif
    for (const Kernels* k : paths)
        for (int nx : {1, 4, 16}) {
            std::vector<float> x(cols * size_t(nx)), t(cols / 4 * size_t(nx) * 16), out(64 * size_t(nx));
            for (auto& v : x) v = float(rng() % 1000) * 0.001f;
            k->sign_tables(x.data(), cols, nx, cols, t.data());
            double best = 1e9;
            for (int rep = 0; rep < 20; ++rep) {
                const auto t0 = std::chrono::steady_clock::now();
                for (size_t r = 0; r < rows; r += 64)
                    k->table_sums(bits.data() + r * row_bytes, row_bytes, 64, t.data(), nx, cols, cols / 4, out.data());
                best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            }
            std::printf("%-7s %2d batch rows: %7.3f ms  %6.1f G weights x rows / s\n", k->name, nx, best * 1e3,
                        double(rows * cols) * nx / best / 1e9);
        }
    std::vector<float> delta(rows * cols);
    for (auto& v : delta) v = float(int(rng() % 2001) - 1000) * 1e-6f;
    const ArrayRef d{delta.data(), DType::F32, {int64_t(rows), int64_t(cols)}};
    for (const char* scope : {"tensor", "row", "group"}) {
        const Encoded e = encode("sign", std::string("{\"scope\":\"") + scope + "\"}", d, 1);
        EncodedRef ref{"w", e.codec, e.params, {int64_t(rows), int64_t(cols)}, DType::F32, {}};
        for (const auto& c : e.components) ref.components[c.first] = c.second.ref;
        for (int nx : {1, 4, 16}) {
            std::vector<float> x(cols * size_t(nx), 0.5f), y(rows * size_t(nx));
            double best = 1e9;
            for (int rep = 0; rep < 20; ++rep) {
                const auto t0 = std::chrono::steady_clock::now();
                delta_product(ref, x.data(), nx, 1.0f, y.data(), 1);
                best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            }
            std::printf("delta_product scope=%-6s %2d batch rows: %7.3f ms\n", scope, nx, best * 1e3);
        }
    }
}
