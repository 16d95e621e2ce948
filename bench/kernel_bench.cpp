// Single-thread sign products on every SIMD path this machine has: 4096 x 4096 sign bits in 64-row calls (as
// delta_products hands them out), 1, 4 and 16 batch rows, the bits and tables in cache. Best of 20.
//     cmake -S . -B build -DDELTAPACK_TESTS=ON && cmake --build build --target kernel_bench && build/kernel_bench
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

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
}
