// libFuzzer target: a delta file from a stranger. Opens the bytes as they are (an exact-size buffer, so
// AddressSanitizer sees any read past the end), then validates, decodes and applies every tensor without
// checksums (an attacker writes valid ones). The only acceptable failure is a FormatError or
// std::invalid_argument; anything else (another exception, a sanitizer report, a crash) is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "deltapack/deltapack.h"

using namespace deltapack;

static constexpr int64_t kMaxElements = int64_t(1) << 20;  // decode only what a small input can describe

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
                apply(e, ArrayRef{base.data(), DType::F16, e.shape}, ArrayRef{rebuilt.data(), DType::BF16, e.shape}, p);
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
