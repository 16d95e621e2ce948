// deltapack-apply: rebuild fine-tuned weights from a base and a delta file, with no Python.
// A small, complete example of the C++ API (cpp/include/deltapack/deltapack.h).
//
//   deltapack-apply BASE DELTA.dpk OUT [--alpha A] [--dtype bf16|f16|f32] [--threads N] [--force] [--overwrite]
//
// A delta made by `deltapack compress` (a checkpoint delta) is rebuilt as `deltapack apply` does it, to the
// same bytes: BASE a Hugging Face directory gives a directory OUT (shards, index, config and tokenizer
// files), BASE one .safetensors file gives one file. A plain delta file (`deltapack.save` of some tensors)
// is applied to a BASE .safetensors file: every tensor of BASE is written to OUT, those the delta names
// get base + alpha * delta in the base's dtype.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "deltapack/deltapack.h"

// A plain delta file over one safetensors file: every base tensor out, the named ones rebuilt.
static void apply_plain(const std::string& base_path, const deltapack::DeltaFile& delta, const std::string& out_path,
                        const deltapack::ApplyParams& params) {
    auto base = deltapack::SafetensorsFile::open(base_path);
    for (const std::string& name : delta.keys())
        if (!base->contains(name)) throw std::invalid_argument(delta.path() + ": tensor '" + name + "' is not in the base " + base_path);
    std::vector<deltapack::Array> owned;  // rebuilt tensors
    std::vector<std::pair<std::string, deltapack::ArrayRef>> out;
    for (const std::string& name : base->keys()) {
        const deltapack::ArrayRef& b = base->get(name);
        if (!delta.contains(name)) {
            out.emplace_back(name, b);  // unchanged: written straight from the mapping
            continue;
        }
        owned.push_back(deltapack::Array::zeros(b.dtype, b.shape));
        deltapack::apply(delta.get(name), b, owned.back().ref, params);
        out.emplace_back(name, owned.back().ref);
    }
    deltapack::write_safetensors(out_path, out, base->metadata());
    std::printf("%s: %zu tensors, %zu rebuilt from %s\n", out_path.c_str(), out.size(), owned.size(), delta.path().c_str());
}

int main(int argc, char** argv) {
    std::vector<std::string> pos;
    deltapack::ApplyCheckpointOptions opt;
    bool usage = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--alpha" && i + 1 < argc) opt.alpha = std::strtof(argv[++i], nullptr);
        else if (a == "--threads" && i + 1 < argc) opt.threads = std::atoi(argv[++i]);
        else if (a == "--dtype" && i + 1 < argc) opt.dtype = argv[++i];
        else if (a == "--force") opt.force = true;
        else if (a == "--overwrite") opt.overwrite = true;
        else if (a == "-h" || a == "--help" || a.compare(0, 2, "--") == 0) usage = true;
        else pos.push_back(a);
    }
    if (usage || pos.size() != 3) {
        std::fprintf(stderr, "usage: deltapack-apply BASE DELTA.dpk OUT [--alpha A] [--dtype bf16|f16|f32] "
                             "[--threads N] [--force] [--overwrite]\n");
        return 2;
    }
    try {
        auto delta = deltapack::DeltaFile::open(pos[1]);
        if (deltapack::CheckpointDelta::recorded_in(*delta)) {  // made by `deltapack compress`
            delta.reset();
            deltapack::CheckpointOutput r = deltapack::apply_checkpoint(pos[0], pos[1], pos[2], opt);
            std::printf("%s: %zu tensors, %llu bytes\n", r.path.c_str(), r.tensors, (unsigned long long)r.bytes);
        } else {
            deltapack::ApplyParams params = deltapack::apply_default_params();
            params.alpha = opt.alpha;
            params.threads = opt.threads;
            apply_plain(pos[0], *delta, pos[2], params);
        }
    } catch (const std::exception& ex) {
        std::fprintf(stderr, "deltapack-apply: %s\n", ex.what());
        return 1;
    }
    return 0;
}
