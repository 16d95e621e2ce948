// libFuzzer target: the manifest fields deltapack reads beyond the tensors (a checkpoint record, the base
// fingerprint, the budget, PEFT and calibration records), mutated structurally. Input = a delta file. The custom
// mutator parses the header, picks a node of the manifest's JSON and replaces it with a value of another type or an
// edge value, drops or adds a member, or copies another subtree there; the result is valid JSON and a valid
// safetensors header, so most inputs pass the parser and reach the schema (check_manifest_fields) and the
// record's semantics (CheckpointDelta). Byte-level mutation (libFuzzer's own) runs one time in four.
//
// Opening must end in a FormatError or a file; CheckpointDelta over no base must accept the record or refuse it
// with FormatError / BaseMismatch; for a record it accepts, every tensor is rebuilt from caller memory
// (rebuild_from), and no tensor without a base may decode to more than 8 elements per stored byte (the bound of
// docs/FORMAT.md §7).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "deltapack/deltapack.h"
#include "json.h"

using namespace deltapack;

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

static constexpr int64_t kMaxElements = int64_t(1) << 18;  // rebuild only what a small input can describe

namespace {

// Every node of a JSON tree, parents before children.
void collect(json::Value& v, std::vector<json::Value*>& out) {
    out.push_back(&v);
    for (auto& e : v.arr) collect(e, out);
    for (auto& kv : v.obj) collect(kv.second, out);
}

json::Value edge_value(std::mt19937_64& rng) {
    static const int64_t ints[] = {0, 1, -1, 7, 1 << 20, int64_t(1) << 31, int64_t(1) << 48, (int64_t(1) << 62) + 1,
                                   INT64_MAX, INT64_MIN};
    static const char* strings[] = {"", "x", "same", "delta", "new", "resized", "F32", "BF16", "I8", "f16", "sign",
                                    "config.json", "model.safetensors", "a.index.json", "../up", ".hidden",
                                    "00000000", "zzzzzzzz", "QUJD", "QUJ", "w", "w#new_rows", "__metadata__"};
    json::Value v;
    switch (rng() % 9) {
        case 0: return v;  // null
        case 1: v.kind = json::Value::Bool; v.b = rng() & 1; return v;
        case 2: return json::Value::make_int(ints[rng() % (sizeof ints / sizeof *ints)]);
        case 3: return json::Value::make_number(rng() & 1 ? 1.5 : 1e300);
        case 4: return json::Value::make_string(strings[rng() % (sizeof strings / sizeof *strings)]);
        case 5: return json::Value::make_string(std::string(1 + rng() % 300, char('a' + rng() % 26)) +
                                                (rng() & 1 ? std::string(1, char(rng() % 32)) : ""));
        case 6: {
            json::Value a = json::Value::make_array();
            const int n = int(rng() % 4);
            for (int i = 0; i < n; ++i) a.arr.push_back(json::Value::make_int(ints[rng() % 7]));
            return a;
        }
        case 7: {
            json::Value a = json::Value::make_array();
            a.arr.push_back(json::Value::make_string(strings[rng() % (sizeof strings / sizeof *strings)]));
            return a;
        }
        default: return json::Value::make_object();
    }
}

const char* member_name(std::mt19937_64& rng) {
    static const char* keys[] = {"op", "dtype", "shape", "source", "base_shape", "new_rows", "version", "tensors",
                                 "removed", "ft_bytes", "files", "text", "base64", "crc32c", "checkpoint", "budget",
                                 "peft", "calibration", "config", "fingerprint", "modules", "scores", "data"};
    return keys[rng() % (sizeof keys / sizeof *keys)];
}

// One structural change of the manifest (an object: it stays one).
void mutate(json::Value& man, std::mt19937_64& rng) {
    std::vector<json::Value*> nodes;
    collect(man, nodes);
    json::Value& v = nodes.size() > 1 ? *nodes[1 + rng() % (nodes.size() - 1)] : man;  // not the root itself
    switch (rng() % 5) {
        case 0:
        case 1:
            if (&v != &man) v = edge_value(rng);
            break;
        case 2:  // drop a member
            if (v.kind == json::Value::Object && !v.obj.empty()) v.obj.erase(v.obj.begin() + long(rng() % v.obj.size()));
            break;
        case 3:  // add or replace a member with a known name
            if (v.kind == json::Value::Object) v.set(member_name(rng), edge_value(rng));
            break;
        default: {  // another subtree here (a shape where a string was, a tensor entry as a file, ...)
            const json::Value copy = *nodes[rng() % nodes.size()];
            if (&v != &man) v = copy;
        }
    }
}

// The delta file's header and data section, split (false if it is not a safetensors file with a manifest).
bool split(const uint8_t* data, size_t size, json::Value& header, json::Value& man, size_t& data_at) {
    if (size < 8) return false;
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= uint64_t(data[i]) << (8 * i);
    if (n > size - 8) return false;
    try {
        header = json::parse(std::string(reinterpret_cast<const char*>(data) + 8, size_t(n)));
        const json::Value* meta = header.find("__metadata__");
        const json::Value* text = meta ? meta->find("deltapack") : nullptr;
        if (!text || text->kind != json::Value::String) return false;
        man = json::parse(text->str);
    } catch (const std::exception&) {
        return false;
    }
    data_at = size_t(8 + n);
    return man.kind == json::Value::Object;
}

}  // namespace

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
    std::mt19937_64 rng(seed);
    json::Value header, man;
    size_t data_at = 0;
    if (rng() % 4 == 0 || !split(data, size, header, man, data_at)) return LLVMFuzzerMutate(data, size, max_size);
    const int changes = 1 + int(rng() % 3);
    for (int i = 0; i < changes; ++i) mutate(man, rng);
    json::Value meta = json::Value::make_object();
    meta.set("deltapack", json::Value::make_string(json::dump(man)));
    header.set("__metadata__", meta);
    std::string text;
    try {
        text = json::dump(header);
    } catch (const std::exception&) {
        return LLVMFuzzerMutate(data, size, max_size);
    }
    text.append((8 - text.size() % 8) % 8, ' ');
    const std::vector<uint8_t> rest(data + data_at, data + size);
    if (8 + text.size() + rest.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
    for (int i = 0; i < 8; ++i) data[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
    std::memcpy(data + 8, text.data(), text.size());
    if (!rest.empty()) std::memcpy(data + 8 + text.size(), rest.data(), rest.size());
    return 8 + text.size() + rest.size();
}

static int64_t numel(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::shared_ptr<const DeltaFile> file;
    try {
        file = DeltaFile::from_memory("fuzz.dpk", data, size);
    } catch (const FormatError&) {
        return 0;
    }
    for (bool force : {false, true}) {
        try {
            CheckpointDelta c(nullptr, file, force);
            for (const CheckpointTensor& t : c.tensors()) {
                const int64_t n = numel(t.shape);
                if (t.kind == TensorKind::Replaced && uint64_t(n) / 8 > file->stored_bytes(t.name)) {
                    std::fprintf(stderr, "tensor '%s' without a base decodes to %lld elements from %llu bytes\n",
                                 t.name.c_str(), (long long)n, (unsigned long long)file->stored_bytes(t.name));
                    std::abort();
                }
                if (n > kMaxElements || t.kind == TensorKind::Resized) continue;
                const DType out_dtype = t.output_dtype(DType::BF16);
                std::vector<uint8_t> base(size_t(n) * dtype_size(t.dtype) + 1, 0), out(size_t(n) * dtype_size(out_dtype) + 1);
                try {
                    c.rebuild_from(t.name, t.kind == TensorKind::Replaced ? nullptr : base.data(), base.size() - 1,
                                   t.dtype, out.data(), out.size() - 1, out_dtype, 1.0f, 1);
                } catch (const FormatError&) {
                } catch (const std::invalid_argument&) {  // BaseMismatch, a dtype it cannot rebuild from
                }
            }
        } catch (const FormatError&) {
        } catch (const std::invalid_argument&) {
        } catch (const std::out_of_range&) {
        } catch (const std::exception& ex) {
            std::fprintf(stderr, "unexpected exception: %s\n", ex.what());
            std::abort();
        }
    }
    return 0;
}
