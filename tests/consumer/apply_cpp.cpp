// A consumer of an installed deltapack through the C++ API (tests/test_install.py builds it with CMake):
// rebuilds one tensor from a base .safetensors file and a delta file.
//   apply_cpp BASE.safetensors DELTA.dpk TENSOR OUT.raw ALPHA    OUT.raw: the tensor in the base's dtype
#include <cstdio>
#include <cstdlib>

#include "deltapack/deltapack.h"

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: apply_cpp BASE.safetensors DELTA.dpk TENSOR OUT.raw ALPHA\n");
        return 2;
    }
    try {
        auto base = deltapack::SafetensorsFile::open(argv[1]);
        auto delta = deltapack::DeltaFile::open(argv[2]);
        const deltapack::TensorInfo& t = base->info(argv[3]);
        deltapack::Array out = deltapack::Array::zeros(t.dtype, t.shape);
        base->read(argv[3], out.ref.data, t.nbytes);  // the base tensor, rebuilt in place
        deltapack::ApplyParams params = deltapack::apply_default_params();
        params.alpha = std::strtof(argv[5], nullptr);
        deltapack::apply(delta->get(argv[3]).ref, out.ref, out.ref, params);
        std::FILE* file = std::fopen(argv[4], "wb");
        if (!file || std::fwrite(out.ref.data, 1, out.ref.nbytes(), file) != out.ref.nbytes() || std::fclose(file) != 0)
            throw std::runtime_error(std::string("cannot write ") + argv[4]);
        std::printf("deltapack (C++ API): %s rebuilt\n", argv[3]);
    } catch (const std::exception& ex) {
        std::fprintf(stderr, "apply_cpp: %s\n", ex.what());
        return 1;
    }
    return 0;
}
