// libFuzzer target: a delta file from a stranger. Opens the bytes as they are (an exact-size buffer, so
// AddressSanitizer sees any read past the end), then validates, decodes and applies every tensor without
// checksums (an attacker writes valid ones), on the CPU engine and through the CUDA kernels' host emulation,
// which must agree bit for bit (and on refusing). The only acceptable failure is a FormatError or
// std::invalid_argument; anything else (another exception, a disagreement, a sanitizer report, a crash) is a
// finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "deltapack/deltapack.h"

using namespace deltapack;

static constexpr int64_t kMaxElements = int64_t(1) << 20;  // decode only what a small input can describe

// Whether two arrays hold the same values bit for bit, NaNs aside: any NaN matches any NaN (which NaN an operation
// on two NaNs returns depends on the operand order a compiler picks, and a GPU returns its canonical NaN).
template <class T>
static bool same_values(const T* a, const T* b, int64_t n) {
    const T magnitude = T(~T(0) >> 1), infinity = sizeof(T) == 4 ? T(0x7f800000u) : T(0x7f80u);  // f32, bf16
    for (int64_t i = 0; i < n; ++i) {
        const bool nan_a = T(a[i] & magnitude) > infinity, nan_b = T(b[i] & magnitude) > infinity;
        if (nan_a != nan_b || (!nan_a && a[i] != b[i])) return false;
    }
    return true;
}

[[noreturn]] static void finding(const char* what, const std::string& tensor) {
    std::fprintf(stderr, "%s (tensor '%s')\n", what, tensor.c_str());
    std::abort();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
        auto f = DeltaFile::from_memory("fuzz.dpk", data, size);
        for (const std::string& name : f->keys()) {
            try {
                const DeltaTensor read = f->get(name, false);  // validated
                const EncodedRef& e = read.ref;
                int64_t n = ArrayRef{nullptr, DType::F32, e.shape}.numel();
                if (n > kMaxElements) continue;
                std::vector<float> out(size_t(n) + 1);
                decode(e, ArrayRef{out.data(), DType::F32, e.shape}, 1);
                std::vector<uint16_t> base(size_t(n) + 1, 0x3c00), rebuilt(size_t(n) + 1);  // f16 ones
                ApplyParams p = apply_default_params();
                p.threads = 1;
                const DeviceDelta emulated(e, kHostEmulation);
                std::vector<float> emulated_out(size_t(n) + 1);
                emulated.decode(emulated_out.data());
                if (!same_values(reinterpret_cast<const uint32_t*>(out.data()),
                                 reinterpret_cast<const uint32_t*>(emulated_out.data()), n))
                    finding("the emulated CUDA decode differs from the CPU's", name);
                std::vector<uint16_t> emulated_rebuilt(size_t(n) + 1);
                bool refused = false, emulation_refused = false;
                try {
                    apply(e, ArrayRef{base.data(), DType::F16, e.shape}, ArrayRef{rebuilt.data(), DType::BF16, e.shape},
                          p);
                } catch (const FormatError&) {
                    refused = true;
                }
                try {
                    emulated.apply(base.data(), DType::F16, emulated_rebuilt.data(), DType::BF16, p);
                } catch (const FormatError&) {
                    emulation_refused = true;
                }
                if (refused != emulation_refused) finding("the CPU and the emulated CUDA apply disagree on refusing", name);
                if (!refused && !same_values(rebuilt.data(), emulated_rebuilt.data(), n))
                    finding("the emulated CUDA apply differs from the CPU's", name);
            } catch (const FormatError&) {
            } catch (const std::invalid_argument&) {
            }
        }
    } catch (const FormatError&) {
    } catch (const std::exception& ex) {
        std::fprintf(stderr, "unexpected exception: %s\n", ex.what());
        std::abort();
    }
    return 0;
}
