// deltapack-apply: rebuild fine-tuned weights from a base and a delta file, with no Python.
// A small, complete example of the C++ API (cpp/include/deltapack/deltapack.h).
//
//   deltapack-apply BASE DELTA.dpk OUT [--alpha A] [--dtype bf16|f16|f32] [--rounding auto|nearest|dithered]
//                   [--threads N] [--force] [--overwrite]
//                   [--follow-links]
//
// A delta made by `deltapack compress` (a checkpoint delta) is rebuilt as `deltapack apply` does it, to the
// same bytes: BASE a Hugging Face directory gives a directory OUT (shards, index, config and tokenizer
// files), BASE one .safetensors file gives one file. A plain delta file (`deltapack.save` of some tensors)
// is applied to a BASE .safetensors file: every tensor of BASE is written to OUT, those the delta names
// get base + alpha * delta in the base's dtype. Either way OUT is checked as `deltapack apply` checks it
// (deltapack::check_output): never BASE or the delta, and an existing OUT only with --overwrite.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "deltapack/deltapack.h"

// A plain delta file over one safetensors file: every base tensor out, the named ones rebuilt, one at a time.
static void apply_plain(const std::string& base_path, const deltapack::DeltaFile& delta, const std::string& out_path,
                        const deltapack::ApplyCheckpointOptions& opt) {
    if (!opt.dtype.empty())
        throw std::invalid_argument(delta.path() + ": a plain delta file is applied in the base's dtypes; --dtype is for "
                                    "deltas made by `deltapack compress`");
    auto base = deltapack::ModelFiles::open(base_path, opt.follow_links);
    if (base->is_directory())
        throw std::invalid_argument(delta.path() + ": a plain delta file (no checkpoint record) applies to one "
                                    ".safetensors file, not to the directory " + base_path);
    for (const std::string& name : delta.keys()) {
        if (!base->contains(name)) throw std::invalid_argument(delta.path() + ": tensor '" + name + "' is not in the base " + base_path);
        if (base->info(name).shape != delta.shape(name))
            throw std::invalid_argument(delta.path() + ": tensor '" + name + "' has another shape than in the base " + base_path);
    }
    deltapack::check_output(out_path, deltapack::OutputKind::SafetensorsFile, {base_path, delta.path()}, opt.overwrite);
    std::vector<deltapack::TensorInfo> infos;
    for (const std::string& name : base->keys()) infos.push_back(base->info(name));
    const std::string& shard = base->shards().front();
    deltapack::SafetensorsWriter w(out_path, infos, base->shard(shard).metadata(), true, opt.overwrite);
    deltapack::ApplyParams params = deltapack::apply_default_params();
    params.alpha = opt.alpha;
    params.threads = opt.threads;
    params.rounding = opt.rounding;
    size_t rebuilt = 0;
    for (const deltapack::TensorInfo& t : infos) {
        std::vector<uint8_t> bytes(size_t(t.nbytes));  // one tensor at a time, as the base holds it
        base->read(t.name, bytes.data(), t.nbytes);
        if (delta.contains(t.name)) {
            deltapack::ArrayRef b{bytes.data(), t.dtype, t.shape};
            deltapack::apply(delta.get(t.name).ref, b, b, params);  // in place, in the base's dtype
            ++rebuilt;
        }
        w.write(t.name, bytes.data(), t.nbytes);
    }
    w.finish();
    std::printf("%s: %zu tensors, %zu rebuilt from %s\n", out_path.c_str(), infos.size(), rebuilt, delta.path().c_str());
}

// A number argument, all of it: "--alpha garbage" is an error, not 0.
static bool parse_float(const char* text, float& out) {
    char* end = nullptr;
    errno = 0;
    out = std::strtof(text, &end);
    return end != text && *end == '\0' && errno == 0 && std::isfinite(out);
}

static bool parse_int(const char* text, int& out) {
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(text, &end, 10);
    out = int(v);
    return end != text && *end == '\0' && errno == 0 && v >= 0 && v <= 4096;
}

int main(int argc, char** argv) {
    std::vector<std::string> pos;
    deltapack::ApplyCheckpointOptions opt;
    std::string problem;
    for (int i = 1; i < argc && problem.empty(); ++i) {
        const std::string a = argv[i];
        const bool has_value = i + 1 < argc;
        if (a == "--alpha" && has_value) {
            if (!parse_float(argv[++i], opt.alpha)) problem = std::string("--alpha ") + argv[i] + ": not a finite number";
        } else if (a == "--threads" && has_value) {
            if (!parse_int(argv[++i], opt.threads)) problem = std::string("--threads ") + argv[i] + ": not a count of threads";
        } else if (a == "--dtype" && has_value) {
            opt.dtype = argv[++i];
            if (opt.dtype != "bf16" && opt.dtype != "f16" && opt.dtype != "f32") problem = "--dtype " + opt.dtype + ": use bf16, f16 or f32";
        } else if (a == "--rounding" && has_value) {
            try {
                opt.rounding = deltapack::rounding_from_name(argv[++i]);
            } catch (const std::invalid_argument& ex) {
                problem = std::string("--rounding: ") + ex.what();
            }
        } else if (a == "--force") {
            opt.force = true;
        } else if (a == "--overwrite") {
            opt.overwrite = true;
        } else if (a == "--follow-links") {
            opt.follow_links = true;
        } else if (a == "-h" || a == "--help") {
            problem = "help";
        } else if (a.compare(0, 1, "-") == 0 && a != "-") {
            problem = "unknown option " + a + (has_value ? "" : " (or it needs a value)");
        } else {
            pos.push_back(a);
        }
    }
    if (problem.empty() && pos.size() != 3) problem = "expected BASE DELTA OUT";
    if (!problem.empty()) {
        if (problem != "help") std::fprintf(stderr, "deltapack-apply: %s\n", problem.c_str());
        std::fprintf(stderr, "usage: deltapack-apply BASE DELTA.dpk OUT [--alpha A] [--dtype bf16|f16|f32] "
                             "[--rounding auto|nearest|dithered] [--threads N] [--force] [--overwrite] "
                             "[--follow-links]\n");
        return 2;
    }
    try {
        auto delta = deltapack::DeltaFile::open(pos[1]);
        if (deltapack::CheckpointDelta::recorded_in(*delta)) {  // made by `deltapack compress`
            delta.reset();
            deltapack::CheckpointOutput r = deltapack::apply_checkpoint(pos[0], pos[1], pos[2], opt);
            std::printf("%s: %zu tensors, %llu bytes\n", r.path.c_str(), r.tensors, (unsigned long long)r.bytes);
        } else {
            apply_plain(pos[0], *delta, pos[2], opt);
        }
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "deltapack-apply: out of memory\n");
        return 1;
    } catch (const std::exception& ex) {
        std::fprintf(stderr, "deltapack-apply: %s\n", ex.what());
        return 1;
    }
    return 0;
}
