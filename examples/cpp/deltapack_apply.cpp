// deltapack-apply: rebuild fine-tuned weights from a base safetensors file and a delta file,
// with no Python. A small, complete example of the C++ API (cpp/include/deltapack/deltapack.h).
//
//   deltapack-apply BASE.safetensors DELTA.dpk OUT.safetensors [--alpha A] [--threads N]
//
// Every tensor of BASE is written to OUT; those the delta names get base + alpha * delta, in the
// base's dtype. Tensors the delta names that BASE lacks are an error.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "deltapack/deltapack.h"

int main(int argc, char** argv) {
    std::vector<std::string> pos;
    deltapack::ApplyParams params = deltapack::apply_default_params();
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--alpha") && i + 1 < argc) params.alpha = std::strtof(argv[++i], nullptr);
        else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) params.threads = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "-h") || !std::strcmp(argv[i], "--help")) pos.clear(), argc = 0;
        else pos.push_back(argv[i]);
    }
    if (pos.size() != 3) {
        std::fprintf(stderr, "usage: deltapack-apply BASE.safetensors DELTA.dpk OUT.safetensors [--alpha A] [--threads N]\n");
        return 2;
    }
    try {
        auto base = deltapack::SafetensorsFile::open(pos[0]);
        auto delta = deltapack::DeltaFile::open(pos[1]);
        for (const std::string& name : delta->keys())
            if (!base->contains(name)) throw std::invalid_argument(pos[1] + ": tensor '" + name + "' is not in the base " + pos[0]);
        std::vector<deltapack::Array> owned;  // rebuilt tensors
        std::vector<std::pair<std::string, deltapack::ArrayRef>> out;
        for (const std::string& name : base->keys()) {
            const deltapack::ArrayRef& b = base->get(name);
            if (!delta->contains(name)) {
                out.emplace_back(name, b);  // unchanged: written straight from the mapping
                continue;
            }
            owned.push_back(deltapack::Array::zeros(b.dtype, b.shape));
            deltapack::apply(delta->get(name), b, owned.back().ref, params);
            out.emplace_back(name, owned.back().ref);
        }
        deltapack::write_safetensors(pos[2], out, base->metadata());
        std::printf("%s: %zu tensors, %zu rebuilt from %s\n", pos[2].c_str(), out.size(), owned.size(), pos[1].c_str());
    } catch (const std::exception& ex) {
        std::fprintf(stderr, "deltapack-apply: %s\n", ex.what());
        return 1;
    }
    return 0;
}
