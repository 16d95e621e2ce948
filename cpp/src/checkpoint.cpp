// Rebuilding a fine-tuned checkpoint from its base and the record `deltapack compress` keeps in the
// delta file (docs/checkpoints.md). The record is input from strangers: every name, shape and kind is
// checked against the delta file and the base before anything is read.
#include <sys/stat.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "codec.h"

namespace deltapack {

const char* tensor_kind_name(TensorKind k) {
    switch (k) {
        case TensorKind::Unchanged: return "same";
        case TensorKind::Delta: return "delta";
        case TensorKind::Replaced: return "new";
        case TensorKind::Resized: return "resized";
    }
    return "?";
}

DType CheckpointTensor::output_dtype(DType requested) const { return is_float_dtype(dtype) ? requested : dtype; }

uint64_t CheckpointTensor::nbytes(DType out) const {
    uint64_t n = dtype_size(out);
    for (int64_t d : shape) n *= uint64_t(d);
    return n;
}

static int64_t numel_of(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

// ---------------------------------------------------------------------------- the manifest's fields

namespace {

const char* kind_of(const json::Value& v) {
    switch (v.kind) {
        case json::Value::Null: return "null";
        case json::Value::Bool: return "a boolean";
        case json::Value::Number: return v.is_integer ? "an integer" : "a number";
        case json::Value::String: return "a string";
        case json::Value::Array: return "an array";
        case json::Value::Object: return "an object";
    }
    return "?";
}

// The schema of the fields deltapack reads from a manifest (docs/FORMAT.md §7): each check names the field by its
// path in the manifest (`metadata.checkpoint.tensors["w"].shape`) and says what it must be.
class Fields {
public:
    explicit Fields(const std::string& path) : path_(path) {}

    [[noreturn]] void fail(const std::string& where, const std::string& problem) const {
        throw FormatError(path_ + ": " + where + " " + problem);
    }
    const json::Value& object(const json::Value& v, const std::string& where) const {
        if (v.kind != json::Value::Object) fail(where, std::string("must be an object, not ") + kind_of(v));
        return v;
    }
    // Member `key` of object `obj` (at `where`), or null when absent and not required.
    const json::Value* member(const json::Value& obj, const char* key, const std::string& where, bool required) const {
        const json::Value* v = obj.find(key);
        if (!v && required) fail(where + "." + key, "is missing");
        return v;
    }
    void string(const json::Value& v, const std::string& where) const {
        if (v.kind != json::Value::String) fail(where, std::string("must be a string, not ") + kind_of(v));
    }
    void integer(const json::Value& v, const std::string& where, int64_t lo) const {
        if (v.kind != json::Value::Number || !v.is_integer || v.integer < lo)
            fail(where, "must be an integer >= " + std::to_string(lo) + ", not " + json::dump(v));
    }
    void number(const json::Value& v, const std::string& where) const {  // the parser admits finite numbers only
        if (v.kind != json::Value::Number) fail(where, std::string("must be a number, not ") + kind_of(v));
    }
    void boolean(const json::Value& v, const std::string& where) const {
        if (v.kind != json::Value::Bool) fail(where, std::string("must be true or false, not ") + kind_of(v));
    }
    void shape(const json::Value& v, const std::string& where) const {
        if (v.kind != json::Value::Array) fail(where, std::string("must be an array of integers >= 0, not ") + kind_of(v));
        std::vector<int64_t> dims;
        for (auto& d : v.arr) {
            if (d.kind != json::Value::Number || !d.is_integer || d.integer < 0)
                fail(where, "must be an array of integers >= 0, not " + json::dump(v));
            dims.push_back(d.integer);
        }
        if (!plausible_shape(dims)) fail(where, json::dump(v) + " is implausibly large");
    }
    void dtype(const json::Value& v, const std::string& where) const {  // safetensors' spelling
        string(v, where);
        try {
            if (safetensors_dtype_name(dtype_from_name(v.str)) == v.str) return;
        } catch (const std::invalid_argument&) {
        }
        fail(where, json::dump(v) + " is not a safetensors dtype (F32, F16, BF16, I64, ...)");
    }
    // `where` for member `key` of an object at `where`.
    static std::string at(const std::string& where, const std::string& key) {
        return where + "[" + json::dump(json::Value::make_string(key)) + "]";
    }

private:
    const std::string& path_;
};

bool is_lower_hex(const std::string& s, size_t digits) {
    return s.size() == digits &&
           std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// "name" or "org/name": letters, digits, '-', '_', '.', each part starting with a letter or digit, no "..".
bool is_hub_id(const std::string& s) {
    if (s.empty() || s.size() > 256 || s.find("..") != std::string::npos) return false;
    size_t slashes = 0;
    for (size_t i = 0; i < s.size(); ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c == '/') ++slashes;
        else if (!std::isalnum(c) && c != '-' && c != '_' && c != '.') return false;
        if ((i == 0 || s[i - 1] == '/') && !std::isalnum(c)) return false;
    }
    return slashes <= 1;
}

bool is_base64(const std::string& s) {
    if (s.size() % 4) return false;
    size_t pad = 0;
    for (char c : s) {
        if (c == '=') ++pad;
        else if (pad || !(std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '/')) return false;
    }
    return pad <= 2;
}

void check_record(const Fields& f, const json::Value& rec, const std::string& where, uint64_t stored_files) {
    f.object(rec, where);
    f.integer(*f.member(rec, "version", where, true), where + ".version", 0);
    const json::Value& tensors = f.object(*f.member(rec, "tensors", where, true), where + ".tensors");
    for (auto& kv : tensors.obj) {
        const std::string w = Fields::at(where + ".tensors", kv.first);
        if (kv.first.empty() || kv.first == "__metadata__") f.fail(w, "is not a tensor name");
        const json::Value& t = f.object(kv.second, w);
        const json::Value& op = *f.member(t, "op", w, true);
        f.string(op, w + ".op");
        if (op.str != "same" && op.str != "delta" && op.str != "new" && op.str != "resized")
            f.fail(w + ".op", json::dump(op) + " is not one of \"same\", \"delta\", \"new\", \"resized\"");
        f.dtype(*f.member(t, "dtype", w, true), w + ".dtype");
        f.shape(*f.member(t, "shape", w, true), w + ".shape");
        if (const json::Value* v = f.member(t, "source", w, false)) f.string(*v, w + ".source");
        if (const json::Value* v = f.member(t, "base_shape", w, op.str == "resized")) f.shape(*v, w + ".base_shape");
        if (const json::Value* v = f.member(t, "new_rows", w, false)) f.string(*v, w + ".new_rows");
    }
    if (const json::Value* removed = f.member(rec, "removed", where, false)) {
        if (removed->kind != json::Value::Array) f.fail(where + ".removed", std::string("must be an array, not ") + kind_of(*removed));
        for (size_t i = 0; i < removed->arr.size(); ++i) f.string(removed->arr[i], where + ".removed[" + std::to_string(i) + "]");
    }
    if (const json::Value* v = f.member(rec, "ft_bytes", where, false)) f.integer(*v, where + ".ft_bytes", 0);
    if (const json::Value* files = f.member(rec, "files", where, false)) {
        f.object(*files, where + ".files");
        if (files->obj.size() > kMaxKeptFiles)  // each is a file apply creates
            f.fail(where + ".files", "holds " + std::to_string(files->obj.size()) + " files, more than the " +
                                         std::to_string(kMaxKeptFiles) + " a model directory may keep");
        uint64_t stored_total = 0;
        for (auto& kv : files->obj) {
            const std::string w = Fields::at(where + ".files", kv.first);
            const std::string problem = kept_file_problem(kv.first);
            if (!problem.empty()) f.fail(w, "names a kept file that " + problem);
            const json::Value& file = f.object(kv.second, w);
            const json::Value* text = f.member(file, "text", w, false);
            const json::Value* b64 = f.member(file, "base64", w, false);
            const json::Value* bytes = f.member(file, "bytes", w, false);
            const json::Value* sha = f.member(file, "sha256", w, bytes != nullptr);
            if (int(!!text) + int(!!b64) + int(!!sha) != 1)
                f.fail(w, "must have exactly one of \"bytes\" (with \"sha256\"), \"sha256\", \"text\" and \"base64\"");
            if (text) f.string(*text, w + ".text");
            if (b64) {
                f.string(*b64, w + ".base64");
                if (!is_base64(b64->str)) f.fail(w + ".base64", "is not valid base64");
            }
            if (sha) {  // of the stored bytes, or of the base's own file (taken from BASE at apply)
                f.string(*sha, w + ".sha256");
                if (!is_lower_hex(sha->str, 64)) f.fail(w + ".sha256", "must be 64 lowercase hex digits");
            }
            if (bytes) {  // [begin, end) of the file's kFilesKey array
                const std::string wb = w + ".bytes";
                if (bytes->kind != json::Value::Array || bytes->arr.size() != 2)
                    f.fail(wb, "must be [begin, end], not " + json::dump(*bytes));
                for (const json::Value& v : bytes->arr) f.integer(v, wb, 0);
                const uint64_t b = uint64_t(bytes->arr[0].integer), e = uint64_t(bytes->arr[1].integer);
                if (e < b) f.fail(wb, json::dump(*bytes) + " ends before it begins");
                if (stored_files != kUnknownSize && e > stored_files)
                    f.fail(wb, json::dump(*bytes) + " passes the end of the " + std::to_string(stored_files) +
                                   " bytes stored under '" + kFilesKey + "'");
                if (e - b > kMaxKeptFile)
                    f.fail(wb, "spans " + std::to_string(e - b) + " bytes, over the limit of " +
                                   std::to_string(kMaxKeptFile >> 20) + " MiB for one kept file");
                if ((stored_total += e - b) > kMaxKeptTotal)  // ranges may overlap: bound what apply writes
                    f.fail(wb, "brings the kept files past " + std::to_string(kMaxKeptTotal >> 20) + " MiB in all");
            }
        }
    }
}

void check_budget(const Fields& f, const json::Value& b, const std::string& where) {
    f.object(b, where);
    for (const char* key : {"bits_per_param", "predicted_error"})
        if (const json::Value* v = f.member(b, key, where, false)) f.number(*v, where + "." + key);
    if (const json::Value* v = f.member(b, "proxy", where, false)) f.string(*v, where + ".proxy");
    if (const json::Value* v = f.member(b, "lora_only", where, false)) f.boolean(*v, where + ".lora_only");
    if (const json::Value* per = f.member(b, "tensors", where, false)) {
        f.object(*per, where + ".tensors");
        for (auto& kv : per->obj) f.number(kv.second, Fields::at(where + ".tensors", kv.first));
    }
    if (const json::Value* data = f.member(b, "data", where, false)) {
        const std::string w = where + ".data";
        f.object(*data, w);
        if (const json::Value* v = f.member(*data, "examples", w, false)) f.integer(*v, w + ".examples", 0);
        if (const json::Value* v = f.member(*data, "refit", w, false)) f.string(*v, w + ".refit");
        if (const json::Value* v = f.member(*data, "tensors_changed", w, false)) f.integer(*v, w + ".tensors_changed", 0);
        if (const json::Value* scores = f.member(*data, "scores", w, false)) {
            f.object(*scores, w + ".scores");
            for (auto& kv : scores->obj) {
                const std::string ws = Fields::at(w + ".scores", kv.first);
                f.object(kv.second, ws);
                for (auto& sv : kv.second.obj) f.number(sv.second, Fields::at(ws, sv.first));
            }
        }
    }
}

void check_peft(const Fields& f, const json::Value& p, const std::string& where) {
    f.object(p, where);
    if (const json::Value* v = f.member(p, "r", where, false))
        if (v->kind != json::Value::Null) f.integer(*v, where + ".r", 1);
    if (const json::Value* v = f.member(p, "lora_alpha", where, false))
        if (v->kind != json::Value::Null) f.number(*v, where + ".lora_alpha");
    if (const json::Value* v = f.member(p, "use_rslora", where, false)) f.boolean(*v, where + ".use_rslora");
    if (const json::Value* mods = f.member(p, "modules", where, false)) {
        f.object(*mods, where + ".modules");
        for (auto& kv : mods->obj) {
            const std::string w = Fields::at(where + ".modules", kv.first);
            f.object(kv.second, w);
            const json::Value& scaling = *f.member(kv.second, "scaling", w, true);
            f.number(scaling, w + ".scaling");
            if (scaling.num == 0) f.fail(w + ".scaling", "must not be 0 (export divides by it)");
            f.number(*f.member(kv.second, "alpha", w, true), w + ".alpha");
            f.integer(*f.member(kv.second, "rank", w, true), w + ".rank", 1);
        }
    }
}

void check_fingerprint(const Fields& f, const json::Value& base) {
    if (base.kind == json::Value::Null) return;
    f.object(base, "base");
    if (const json::Value* v = f.member(base, "fingerprint", "base", false)) f.string(*v, "base.fingerprint");
    if (const json::Value* cfg = f.member(base, "config", "base", false))
        if (cfg->kind != json::Value::Null) f.object(*cfg, "base.config");
    if (const json::Value* snap = f.member(base, "hub", "base", false)) {  // a Hugging Face cache snapshot
        f.object(*snap, "base.hub");
        const json::Value& id = *f.member(*snap, "id", "base.hub", true);
        f.string(id, "base.hub.id");
        if (!is_hub_id(id.str)) f.fail("base.hub.id", json::dump(id) + " is not a Hugging Face model id (org/name)");
        const json::Value& rev = *f.member(*snap, "revision", "base.hub", true);
        f.string(rev, "base.hub.revision");
        if (!is_lower_hex(rev.str, 40)) f.fail("base.hub.revision", "must be a commit: 40 lowercase hex digits");
    }
    if (const json::Value* tensors = f.member(base, "tensors", "base", false)) {
        f.object(*tensors, "base.tensors");
        for (auto& kv : tensors->obj) {
            const std::string w = Fields::at("base.tensors", kv.first);
            const json::Value& t = f.object(kv.second, w);
            f.dtype(*f.member(t, "dtype", w, true), w + ".dtype");
            f.shape(*f.member(t, "shape", w, true), w + ".shape");
            if (const json::Value* crc = f.member(t, "crc32c", w, false)) {
                f.string(*crc, w + ".crc32c");
                if (!is_lower_hex(crc->str, 8)) f.fail(w + ".crc32c", "must be 8 lowercase hex digits");
            }
        }
    }
}

}  // namespace

void check_manifest_fields(const json::Value& man, const std::string& path, uint64_t stored_files) {
    const Fields f(path);
    if (const json::Value* tool = man.find("tool")) f.string(*tool, "tool");
    if (const json::Value* base = man.find("base")) check_fingerprint(f, *base);
    const json::Value* meta = man.find("metadata");
    if (!meta || meta->kind != json::Value::Object) return;  // free-form user metadata
    if (const json::Value* v = meta->find("checkpoint")) check_record(f, *v, "metadata.checkpoint", stored_files);
    if (const json::Value* v = meta->find("budget")) check_budget(f, *v, "metadata.budget");
    if (const json::Value* v = meta->find("peft")) check_peft(f, *v, "metadata.peft");
    if (const json::Value* v = meta->find("calibration")) {
        f.object(*v, "metadata.calibration");
        for (const char* key : {"examples", "tensors"})
            if (const json::Value* n = f.member(*v, key, "metadata.calibration", false))
                f.integer(*n, std::string("metadata.calibration.") + key, 0);
    }
}

static std::vector<int64_t> shape_of(const json::Value& v) {  // a shape check_manifest_fields accepted
    std::vector<int64_t> s;
    for (auto& d : v.arr) s.push_back(d.integer);
    return s;
}

static std::string shape_text(const std::vector<int64_t>& shape) {
    json::Value a = json::Value::make_array();
    for (int64_t d : shape) a.arr.push_back(json::Value::make_int(d));
    return json::dump(a);
}

CheckpointDelta::CheckpointDelta(std::shared_ptr<const ModelFiles> base, std::shared_ptr<const DeltaFile> delta,
                                 bool force)
    : base_(std::move(base)), delta_(std::move(delta)), force_(force) {
    const std::string& dpath = delta_->path();
    auto fail = [&](const std::string& m) -> void { throw FormatError(dpath + ": " + m); };
    // The types of every field read here were checked when the file was opened (check_manifest_fields).
    const json::Value man = json::parse(delta_->manifest());
    const json::Value* meta = man.find("metadata");
    const json::Value* rec = meta && meta->kind == json::Value::Object ? meta->find("checkpoint") : nullptr;
    if (!rec)
        fail("not a checkpoint delta (no metadata['checkpoint'] record; it was not made by `deltapack compress`)");
    const json::Value& ver = *rec->find("version");
    if (ver.integer != 1) fail("checkpoint record version " + json::dump(ver) + " is not supported");
    record_ = json::dump(*rec);

    // The fingerprint of the base the delta was made from.
    const json::Value* fp_base = man.find("base");
    const json::Value* fp = fp_base && fp_base->kind == json::Value::Object ? fp_base->find("tensors") : nullptr;
    if (fp) {
        for (auto& kv : fp->obj) {
            Fingerprint& f = fingerprint_[kv.first];
            f.dtype = kv.second.find("dtype")->str;
            f.shape = shape_of(*kv.second.find("shape"));
            if (const json::Value* crc = kv.second.find("crc32c")) f.has_crc = true, f.crc = uint32_t(std::stoul(crc->str, nullptr, 16));
        }
        if (!force_ && base_) {
            const std::string& bp = base_->path();
            auto mismatch = [&](const std::string& m) -> void {
                throw BaseMismatch(bp + ": this is not the delta's base: " + m);
            };
            for (auto& kv : fingerprint_) {
                if (!base_->contains(kv.first))
                    mismatch("tensor '" + kv.first + "' is missing (use --force / force=True to apply anyway)");
                const TensorInfo& bi = base_->info(kv.first);
                if (kv.second.dtype != safetensors_dtype_name(bi.dtype) || kv.second.shape != bi.shape)
                    mismatch("tensor '" + kv.first + "' is " + safetensors_dtype_name(bi.dtype) + " " + shape_text(bi.shape) +
                             ", the delta was made against " + kv.second.dtype + " " + shape_text(kv.second.shape) +
                             " (use --force / force=True to apply anyway)");
            }
            for (const std::string& name : base_->keys())
                if (!fingerprint_.count(name))
                    mismatch("it has tensor '" + name + "' that the delta's base lacked (use --force / force=True to apply anyway)");
        }
    }

    // What the outputs may cost (docs/FORMAT.md §7): a base tensor is the source of at most two fine-tune tensors
    // (itself and a tied twin), each stored delta tensor serves one fine-tune tensor, and a tensor without a base
    // is stored `dense` (its values, as compress stores them: what it decodes to is what the file holds, and at a
    // cost linear in it). So apply writes at most twice the base and twice the stored bytes, whatever the record
    // says.
    std::map<std::string, std::vector<std::string>> uses_of_source;
    std::map<std::string, std::string> user_of_stored;
    for (auto& kv : rec->find("tensors")->obj) {
        const std::string& name = kv.first;
        auto tfail = [&](const std::string& m) { fail("checkpoint record: tensor '" + name + "': " + m); };
        const json::Value& s = kv.second;
        CheckpointTensor t;
        t.name = name;
        const std::string& ops = s.find("op")->str;
        t.kind = ops == "same" ? TensorKind::Unchanged : ops == "delta" ? TensorKind::Delta
                 : ops == "new" ? TensorKind::Replaced : TensorKind::Resized;
        t.dtype = dtype_from_name(s.find("dtype")->str);
        t.shape = shape_of(*s.find("shape"));
        if (t.kind != TensorKind::Replaced) {
            const json::Value* src = s.find("source");
            t.source = src ? src->str : name;
            if (base_ && !base_->contains(t.source))
                throw BaseMismatch(base_->path() + ": tensor '" + t.source + "', needed for '" + name + "', is not in the base");
            std::vector<std::string>& users = uses_of_source[t.source];
            users.push_back(name);
            if (users.size() > 2)
                tfail("is the third tensor rebuilt from base tensor '" + t.source + "' (after '" + users[0] + "' and '" +
                      users[1] + "'); at most two share one (a tensor and its tied twin)");
        }
        // Every stored tensor this one reads must be in the delta file with the shape its kind implies, and serve
        // no other tensor; one with no base under it must be stored dense.
        auto stored = [&](const std::string& key, const std::vector<int64_t>& want, bool has_base) {
            if (!delta_->contains(key)) tfail("delta tensor '" + key + "' is not in the file");
            if (delta_->shape(key) != want) tfail("delta tensor '" + key + "' has another shape than it needs");
            auto used = user_of_stored.emplace(key, name);
            if (!used.second) tfail("delta tensor '" + key + "' is already used by tensor '" + used.first->second + "'");
            const std::string codec = delta_->entry(key).codec;
            if (!has_base && codec != "dense")
                tfail("delta tensor '" + key + "' has no base under it and is stored " + codec + " (" +
                      std::to_string(delta_->stored_bytes(key)) + " bytes for " + std::to_string(numel_of(want)) +
                      " elements); such a tensor must be stored dense, its values as they are (docs/FORMAT.md §7)");
        };
        // The source's shape and dtype: from the base, else from the fingerprint (else checked when rebuilt).
        const std::vector<int64_t>* bshape = nullptr;
        DType bdtype = t.dtype;
        if (!t.source.empty() && base_) {
            bshape = &base_->info(t.source).shape;
            bdtype = base_->info(t.source).dtype;
        } else if (!t.source.empty() && fingerprint_.count(t.source)) {
            const Fingerprint& f = fingerprint_.at(t.source);
            bshape = &f.shape;
            bdtype = dtype_from_name(f.dtype);
        }
        switch (t.kind) {
            case TensorKind::Unchanged:
                if (bshape && *bshape != t.shape) tfail("is unchanged but its shape differs from base tensor '" + t.source + "'");
                if (!is_float_dtype(t.dtype) && bdtype != t.dtype)
                    tfail("is unchanged but its dtype differs from base tensor '" + t.source + "'");
                break;
            case TensorKind::Delta:
                if (bshape && *bshape != t.shape) tfail("shape differs from base tensor '" + t.source + "'");
                if (!is_float_dtype(t.dtype) || !is_float_dtype(bdtype)) tfail("a delta needs float tensors");
                stored(name, t.shape, true);
                break;
            case TensorKind::Replaced:
                if (!is_float_dtype(t.dtype)) tfail("a stored tensor must be f32, f16 or bf16");
                stored(name, t.shape, false);
                break;
            case TensorKind::Resized: {
                const std::vector<int64_t> recorded = shape_of(*s.find("base_shape"));
                if (!bshape) bshape = &recorded;  // neither base nor fingerprint: the record's word, bounded by the file
                else if (*bshape != recorded && !force_)
                    tfail("base_shape " + shape_text(recorded) + " is not base tensor '" + t.source + "''s " + shape_text(*bshape));
                if (t.shape.empty() || bshape->size() != t.shape.size() ||
                    !std::equal(t.shape.begin() + 1, t.shape.end(), bshape->begin() + 1))
                    tfail("is resized along dim 0 but base tensor '" + t.source + "' differs in another dimension");
                if (!is_float_dtype(t.dtype) || !is_float_dtype(bdtype)) tfail("a delta needs float tensors");
                std::vector<int64_t> shared = t.shape;
                shared[0] = std::min(t.shape[0], (*bshape)[0]);
                stored(name, shared, true);
                const json::Value* nr = s.find("new_rows");
                if (t.shape[0] > shared[0]) {
                    if (!nr) tfail("grows along dim 0 but has no new_rows tensor");
                    t.new_rows = nr->str;
                    std::vector<int64_t> rows = t.shape;
                    rows[0] = t.shape[0] - shared[0];
                    stored(t.new_rows, rows, false);
                }
                break;
            }
        }
        index_[name] = tensors_.size();
        tensors_.push_back(std::move(t));
    }
    if (const json::Value* rm = rec->find("removed"))
        for (auto& r : rm->arr) removed_.push_back(r.str);
}

bool CheckpointDelta::recorded_in(const DeltaFile& delta) {
    const json::Value man = json::parse(delta.manifest());
    const json::Value* meta = man.find("metadata");
    const json::Value* rec = meta && meta->kind == json::Value::Object ? meta->find("checkpoint") : nullptr;
    return rec && rec->kind == json::Value::Object;
}

const CheckpointTensor& CheckpointDelta::tensor(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) throw std::out_of_range(delta_->path() + ": the fine-tune has no tensor '" + name + "'");
    return tensors_[it->second];
}

void CheckpointDelta::read_base(const std::string& src, void* out, uint64_t nbytes) const {
    base_->read(src, out, nbytes);
    if (!force_) check_contents(src, out, nbytes);
}

void CheckpointDelta::check_contents(const std::string& src, const void* data, uint64_t nbytes) const {
    auto it = fingerprint_.find(src);
    if (it != fingerprint_.end() && it->second.has_crc) check_crc(src, crc32c(data, size_t(nbytes)));
}

void CheckpointDelta::check_crc(const std::string& src, uint32_t got) const {
    auto it = fingerprint_.find(src);
    if (it == fingerprint_.end() || !it->second.has_crc) return;
    if (got != it->second.crc) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "CRC-32C %08x, expected %08x", got, it->second.crc);
        throw BaseMismatch((base_ ? base_->path() : std::string("the base")) + ": this is not the delta's base: tensor '" +
                           src + "' has different contents (" + buf + "; use --force / force=True to apply anyway)");
    }
}

// out (n elements of `to`) = the n elements of `from` at src, rounded once (f32 widened exactly).
static void convert(const void* src, DType from, void* out, DType to, size_t n) {
    if (from == to) {
        std::memcpy(out, src, n * dtype_size(to));
        return;
    }
    std::vector<float> buf(std::min<size_t>(n, size_t(1) << 16));
    for (size_t i = 0; i < n; i += buf.size()) {
        const size_t m = std::min(buf.size(), n - i);
        kernels().to_f32(static_cast<const uint8_t*>(src) + i * dtype_size(from), from, buf.data(), m);
        void* dst = static_cast<uint8_t*>(out) + i * dtype_size(to);
        for (size_t j = 0; j < m; ++j) store_one(dst, to, j, buf[j]);
    }
}

const CheckpointTensor& CheckpointDelta::check_out(const std::string& name, uint64_t out_bytes, DType out_dtype) const {
    const CheckpointTensor& t = tensor(name);
    if (out_dtype != t.output_dtype(out_dtype) || (!is_float_dtype(t.dtype) && out_dtype != t.dtype))
        throw std::invalid_argument(delta_->path() + ": tensor '" + name + "' is " + safetensors_dtype_name(t.dtype) +
                                    ", it cannot be rebuilt as " + safetensors_dtype_name(out_dtype));
    if (out_bytes != t.nbytes(out_dtype))
        throw std::invalid_argument(delta_->path() + ": tensor '" + name + "': destination holds " +
                                    std::to_string(out_bytes) + " bytes, need " + std::to_string(t.nbytes(out_dtype)));
    return t;
}

void CheckpointDelta::rebuild(const std::string& name, void* out, uint64_t out_bytes, DType out_dtype, float alpha,
                              int threads, Rounding rounding) const {
    const CheckpointTensor& t = check_out(name, out_bytes, out_dtype);
    if (t.kind == TensorKind::Replaced) return rebuild_core(t, nullptr, out_dtype, out, out_dtype, alpha, threads);
    if (!base_) throw std::logic_error(delta_->path() + ": no base model was given: use rebuild_from");
    const TensorInfo& bi = base_->info(t.source);
    if (bi.dtype == out_dtype && bi.nbytes == out_bytes) {  // in place: one tensor-sized buffer
        read_base(t.source, out, out_bytes);
        return rebuild_core(t, out, bi.dtype, out, out_dtype, alpha, threads, rounding);
    }
    std::vector<uint8_t> scratch(size_t(bi.nbytes));
    read_base(t.source, scratch.data(), bi.nbytes);
    rebuild_core(t, scratch.data(), bi.dtype, out, out_dtype, alpha, threads, rounding);
}

// The CRC-32C of consecutive blocks of `block` bytes (the last one shorter) covering `total` bytes, from
// the blocks' own CRCs (computed on several threads).
template <class Crcs>
static uint32_t joined_crc(const Crcs& crcs, uint64_t block, uint64_t total) {
    uint32_t crc = 0;
    for (size_t b = 0; b < crcs.size(); ++b)
        crc = crc32c_combine(crc, crcs[b], std::min(block, total - b * block));
    return crc;
}

void CheckpointDelta::rebuild_blocks(const std::string& name, DType out_dtype, float alpha, int threads,
                                     const std::function<void(uint64_t, const void*, uint64_t)>& sink,
                                     Rounding rounding) const {
    const CheckpointTensor& t = tensor(name);
    const uint64_t out_bytes = t.nbytes(out_dtype);
    check_out(name, out_bytes, out_dtype);
    if (!base_ || (t.kind != TensorKind::Delta && t.kind != TensorKind::Unchanged)) {  // whole, at once
        std::vector<uint8_t> whole(static_cast<size_t>(out_bytes));
        rebuild(name, whole.data(), out_bytes, out_dtype, alpha, threads, rounding);
        if (out_bytes) sink(0, whole.data(), out_bytes);
        return;
    }
    const TensorInfo& bi = base_->info(t.source);
    const uint64_t numel = uint64_t(numel_of(t.shape));
    if (numel == 0) return;
    // Blocks of whole rows of the delta's (rows, cols) view, about 4 MiB of output each: small enough to
    // stay in cache from the read to the sink.
    const uint64_t cols = uint64_t(Matrix::of(t.shape).cols), rows = numel / cols;
    const size_t bsz = dtype_size(bi.dtype), osz = dtype_size(out_dtype);
    const uint64_t block_rows = std::max<uint64_t>(1, (uint64_t(4) << 20) / (cols * osz));
    const int64_t blocks = int64_t((rows + block_rows - 1) / block_rows);
    const bool in_place = bi.dtype == out_dtype;
    DeltaTensor enc;  // read once for all the blocks
    if (t.kind == TensorKind::Delta) enc = delta_->get(t.name);
    ApplyParams p = apply_default_params();
    p.alpha = alpha;
    p.threads = 1;  // the blocks are the parallel work
    p.rounding = rounding;
    std::vector<uint32_t> crcs(static_cast<size_t>(blocks));
    parallel_rows(blocks, int64_t(block_rows * cols), threads, [&](int64_t b0, int64_t b1) {
        std::vector<uint8_t> in(size_t(block_rows * cols * bsz)), out(in_place ? 0 : size_t(block_rows * cols * osz));
        for (int64_t b = b0; b < b1; ++b) {
            const uint64_t r0 = uint64_t(b) * block_rows, n = std::min(block_rows, rows - r0);
            base_->read(t.source, in.data(), n * cols * bsz, r0 * cols * bsz);
            crcs[size_t(b)] = crc32c(in.data(), size_t(n * cols * bsz));
            void* dst = in_place ? in.data() : out.data();
            if (t.kind == TensorKind::Delta)
                apply_rows(enc.ref, int64_t(r0), int64_t(n), in.data(), bi.dtype, dst, out_dtype, p);
            else if (!in_place)
                convert(in.data(), bi.dtype, dst, out_dtype, size_t(n * cols));
            sink(r0 * cols * osz, dst, n * cols * osz);
        }
    });
    if (!force_) check_crc(t.source, joined_crc(crcs, block_rows * cols * bsz, rows * cols * bsz));
}

void CheckpointDelta::rebuild_from(const std::string& name, const void* base, uint64_t base_bytes, DType base_dtype,
                                   void* out, uint64_t out_bytes, DType out_dtype, float alpha, int threads,
                                   bool check_crc, Rounding rounding) const {
    const CheckpointTensor& t = check_out(name, out_bytes, out_dtype);
    if (t.kind != TensorKind::Replaced) {
        const std::string what = delta_->path() + ": tensor '" + name + "': base tensor '" + t.source + "'";
        if (!base) throw std::invalid_argument(what + " is NULL");
        if (!is_float_dtype(base_dtype) && (t.kind != TensorKind::Unchanged || base_dtype != t.dtype))
            throw std::invalid_argument(what + " is " + safetensors_dtype_name(base_dtype) + ", not a float dtype");
        // Its size: the fine-tune's shape, but for a resized tensor the base's row count (known from the base or
        // the fingerprint).
        std::vector<int64_t> shape = t.shape;
        if (t.kind == TensorKind::Resized) {
            auto fp = fingerprint_.find(t.source);
            if (base_) shape = base_->info(t.source).shape;
            else if (fp != fingerprint_.end()) shape = fp->second.shape;
            else throw std::invalid_argument(what + ": its row count is unknown (no base and no fingerprint)");
        }
        uint64_t want = dtype_size(base_dtype);
        for (int64_t d : shape) want *= uint64_t(d);
        if (base_bytes != want)
            throw std::invalid_argument(what + " holds " + std::to_string(base_bytes) + " bytes, need " + std::to_string(want));
        auto fp = fingerprint_.find(t.source);
        if (!force_ && fp != fingerprint_.end()) {
            if (fp->second.dtype != safetensors_dtype_name(base_dtype))
                throw BaseMismatch(what + " is " + safetensors_dtype_name(base_dtype) + ", the delta was made against " +
                                   fp->second.dtype + " (force to apply anyway)");
            if (check_crc) check_contents(t.source, base, base_bytes);
        }
    }
    rebuild_core(t, base, base_dtype, out, out_dtype, alpha, threads, rounding);
}

void CheckpointDelta::rebuild_core(const CheckpointTensor& t, const void* base, DType base_dtype, void* out,
                                   DType out_dtype, float alpha, int threads, Rounding rounding) const {
    const size_t n = size_t(numel_of(t.shape));
    ApplyParams p = apply_default_params();
    p.alpha = alpha;
    p.threads = threads;
    p.rounding = rounding;
    auto decode_into = [&](const std::string& key, void* dst, size_t count) {
        const DeltaTensor e = delta_->get(key);
        std::vector<float> f(count);
        decode(e.ref, ArrayRef{f.data(), DType::F32, e.ref.shape}, threads);
        convert(f.data(), DType::F32, dst, out_dtype, count);
    };
    switch (t.kind) {
        case TensorKind::Unchanged:
            if (base != out) convert(base, base_dtype, out, out_dtype, n);
            return;
        case TensorKind::Replaced:
            decode_into(t.name, out, n);
            return;
        case TensorKind::Delta:
            apply(delta_->get(t.name).ref, ArrayRef{const_cast<void*>(base), base_dtype, t.shape},
                  ArrayRef{out, out_dtype, t.shape}, p);
            return;
        case TensorKind::Resized: {
            const std::vector<int64_t>& shared = delta_->shape(t.name);
            apply(delta_->get(t.name).ref, ArrayRef{const_cast<void*>(base), base_dtype, shared},
                  ArrayRef{out, out_dtype, shared}, p);
            if (!t.new_rows.empty()) {
                const size_t done = size_t(numel_of(shared));
                decode_into(t.new_rows, static_cast<uint8_t*>(out) + done * dtype_size(out_dtype), n - done);
            }
            return;
        }
    }
}

// ---------------------------------------------------------------------------- writing a checkpoint

static std::string base64_decode(const std::string& in, const std::string& what) {
    static const std::string abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    uint32_t acc = 0;
    int bits = 0;
    size_t pad = 0;
    for (char c : in) {
        if (c == '=') { ++pad; continue; }
        const size_t v = abc.find(c);
        if (v == std::string::npos || pad) throw FormatError(what + ": not valid base64");
        acc = (acc << 6) | uint32_t(v);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out += char((acc >> bits) & 0xffu);
        }
    }
    if (pad > 2 || (in.size() % 4) != 0) throw FormatError(what + ": not valid base64");
    return out;
}

static void write_file(const std::string& path, const std::string& data) {
    AtomicFile f(path, false);
    f.write(data.data(), data.size());
    f.commit(false);  // inside an AtomicDir, which makes everything durable at once
}

// The non-weight files of the output: those the delta kept, else, when it kept none, the base directory's own (as
// compress would keep them: read_kept_files); config.json's dtype set to `dtype` if given. Their names were
// checked when the delta was opened (kept_file_problem), so none can replace a shard or the index.
static std::vector<KeptFile> config_files(const CheckpointDelta& c, const std::string& dtype, bool follow_links) {
    // The base directory's own files are read only when needed: the delta names one by its hash, or keeps none
    // (then they are copied), so an apply whose delta stores its files reads no more than before.
    std::vector<KeptFile> files, base_files;
    bool base_read = false;
    auto base_kept = [&]() -> std::vector<KeptFile>& {
        if (!base_read && c.base().is_directory()) base_files = read_kept_files(c.base().path(), follow_links);
        base_read = true;
        return base_files;
    };
    const json::Value rec = json::parse(c.record());
    if (const json::Value* kept = rec.find("files"))
        for (auto& kv : kept->obj) {
            const std::string what = c.delta().path() + ": kept file '" + kv.first + "'";
            if (const json::Value* bytes = kv.second.find("bytes")) {  // in the delta, under kFilesKey
                std::string data =
                    c.delta().stored_file(uint64_t(bytes->arr[0].integer), uint64_t(bytes->arr[1].integer));
                if (sha256_hex(data.data(), data.size()) != kv.second.find("sha256")->str)
                    throw FormatError(what + ": its stored bytes do not match their SHA-256 (the delta is damaged)");
                files.push_back({kv.first, std::move(data)});
            } else if (const json::Value* text = kv.second.find("text")) {
                files.push_back({kv.first, text->str});
            } else if (const json::Value* b64 = kv.second.find("base64")) {
                files.push_back({kv.first, base64_decode(b64->str, what)});
            } else {  // the base's own file: taken from BASE if it is still the one the delta was made with
                const std::string& sha = kv.second.find("sha256")->str;
                const std::string whence = what + " is the base's own (sha256 " + sha + "), but ";
                if (!c.base().is_directory())
                    throw FormatError(whence + "the base " + c.base().path() + " is a file, not a model directory");
                std::vector<KeptFile>& own = base_kept();
                auto it = std::find_if(own.begin(), own.end(), [&](const KeptFile& b) { return b.name == kv.first; });
                const std::string there = c.base().path() + "/" + kv.first;
                if (it == own.end()) throw FormatError(whence + there + " is missing (or not a file deltapack reads)");
                if (sha256_hex(it->data.data(), it->data.size()) != sha)
                    throw FormatError(whence + there + " differs from it: apply needs the base the delta was made "
                                      "with");
                files.push_back(*it);
            }
        }
    if (files.empty()) files = std::move(base_kept());
    for (KeptFile& f : files) {
        if (f.name != "config.json" || dtype.empty()) continue;
        json::Value cfg;
        try {
            cfg = json::parse(f.data);
        } catch (const std::exception& ex) {
            throw FormatError(c.delta().path() + ": kept file 'config.json': not valid JSON (" + ex.what() + ")");
        }
        const char* torch_name = dtype == "f32" ? "float32" : dtype == "f16" ? "float16" : "bfloat16";
        for (const char* key : {"torch_dtype", "dtype"})
            if (cfg.kind == json::Value::Object && cfg.find(key)) cfg.set(key, json::Value::make_string(torch_name));
        f.data = json::dump(cfg, 2) + "\n";
    }
    return files;
}

// A system_error raised while writing in the temporary directory, told with the name the user asked for.
[[noreturn]] static void rethrow_named(const std::system_error& ex, const std::string& tmp, const std::string& out) {
    std::string msg = ex.what();
    const std::string reason = ": " + ex.code().message();
    if (msg.size() >= reason.size() && msg.compare(msg.size() - reason.size(), reason.size(), reason) == 0)
        msg.resize(msg.size() - reason.size());
    for (size_t at; (at = msg.find(tmp)) != std::string::npos;) msg.replace(at, tmp.size(), out);
    throw std::system_error(ex.code(), msg);
}

// ft[name] - base[src] as rows of `cols` elements, the first `rows` of them, read from the files in blocks of
// about 256 KiB of bf16 per tensor as they are asked for (each thread keeps its last block). Every base block's
// CRC-32C is kept, and finish() reads the blocks nobody asked for (rows a resized fine-tune dropped), so the
// base tensor's CRC is whole whatever the codec read.
class FileDeltaRows : public RowSource {
public:
    FileDeltaRows(const ModelFiles& ft, const std::string& name, const ModelFiles& base, const std::string& src,
                  uint64_t rows, uint64_t cols)
        : ft_(ft), base_(base), name_(name), src_(src), fi_(ft.info(name)), bi_(base.info(src)), rows_(rows),
          cols_(std::max<uint64_t>(cols, 1)) {
        const uint64_t ft_numel = uint64_t(numel_of(fi_.shape)), base_numel = uint64_t(numel_of(bi_.shape));
        if (rows * cols > ft_numel || rows * cols > base_numel || (cols && base_numel % cols))
            throw std::invalid_argument(ft.path() + ": tensor '" + name + "': " + std::to_string(rows) + " rows of " +
                                        std::to_string(cols) + " of it and of the base's '" + src + "', which hold " +
                                        std::to_string(ft_numel) + " and " + std::to_string(base_numel) + " elements");
        if (rows * cols != 0 && (!is_float_dtype(fi_.dtype) || !is_float_dtype(bi_.dtype)))
            throw std::invalid_argument(ft.path() + ": tensor '" + name + "' and the base's '" + src +
                                        "' must be f32, f16 or bf16 to subtract");
        base_rows_ = base_numel / cols_;
        block_rows_ = std::max<uint64_t>(1, (uint64_t(256) << 10) / (cols_ * 2));
        const size_t blocks = size_t((base_rows_ + block_rows_ - 1) / block_rows_);
        crcs_ = std::vector<std::atomic<uint32_t>>(blocks);
        done_ = std::vector<std::atomic<bool>>(blocks);
        identical_ = fi_.dtype == bi_.dtype;
    }

    void row(int64_t r, float* dst, const Kernels& k) const override {
        Block& c = block_of(uint64_t(r) / block_rows_);
        const uint64_t i = uint64_t(r) - c.first;
        subtract_f32(c.ft.data() + i * cols_ * dtype_size(fi_.dtype), fi_.dtype,
                     c.base.data() + i * cols_ * dtype_size(bi_.dtype), bi_.dtype, dst, c.base_f32.data(), size_t(cols_), k);
    }

    // The base tensor's CRC-32C, and whether the rows are the same bytes in the same dtype.
    TensorDelta finish() const {
        for (size_t b = 0; b < done_.size(); ++b)
            if (!done_[b]) block_of(b);
        TensorDelta r;
        r.identical = identical_;
        const uint64_t row_bytes = cols_ * dtype_size(bi_.dtype);
        r.base_crc = joined_crc(crcs_, block_rows_ * row_bytes, base_rows_ * row_bytes);
        return r;
    }

private:
    struct Block {
        uint64_t owner = 0, index = ~uint64_t(0), first = 0;
        std::vector<uint8_t> ft, base;
        std::vector<float> base_f32;
    };

    Block& block_of(uint64_t b) const {
        thread_local Block c;
        if (c.owner == serial_ && c.index == b) return c;
        c.owner = serial_, c.index = b, c.first = b * block_rows_;
        const uint64_t n = std::min(block_rows_, base_rows_ - c.first), shared = c.first < rows_ ? std::min(n, rows_ - c.first) : 0;
        const size_t fsz = dtype_size(fi_.dtype), bsz = dtype_size(bi_.dtype);
        c.ft.resize(size_t(block_rows_ * cols_ * fsz));
        c.base.resize(size_t(block_rows_ * cols_ * bsz));
        c.base_f32.resize(size_t(cols_));
        base_.read(src_, c.base.data(), n * cols_ * bsz, c.first * cols_ * bsz);
        crcs_[size_t(b)] = crc32c(c.base.data(), size_t(n * cols_ * bsz));
        done_[size_t(b)] = true;
        if (shared) {
            ft_.read(name_, c.ft.data(), shared * cols_ * fsz, c.first * cols_ * fsz);
            if (identical_.load(std::memory_order_relaxed) && std::memcmp(c.ft.data(), c.base.data(), size_t(shared * cols_ * fsz)))
                identical_ = false;
        }
        return c;
    }

    static inline std::atomic<uint64_t> next_serial_{1};
    const uint64_t serial_ = next_serial_++;  // tells this object's blocks from an earlier one's at the same address
    const ModelFiles &ft_, &base_;
    const std::string name_, src_;
    const TensorInfo &fi_, &bi_;
    uint64_t rows_, cols_, base_rows_ = 0, block_rows_ = 1;
    mutable std::vector<std::atomic<uint32_t>> crcs_;
    mutable std::vector<std::atomic<bool>> done_;
    mutable std::atomic<bool> identical_{false};
};

TensorDelta read_delta(const ModelFiles& ft, const std::string& name, const ModelFiles& base, const std::string& src,
                       uint64_t count, float* out, int threads) {
    const uint64_t cols = uint64_t(Matrix::of(ft.info(name).shape).cols), nrows = cols ? count / cols : 0;
    if (cols ? count % cols != 0 : count != 0)
        throw std::invalid_argument("read_delta: " + std::to_string(count) + " elements of '" + name +
                                    "' are not whole rows of " + std::to_string(cols));
    const FileDeltaRows rows(ft, name, base, src, nrows, cols);
    const Kernels& k = kernels();
    parallel_rows(int64_t(nrows), int64_t(cols), threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) rows.row(r, out + uint64_t(r) * cols, k);
    });
    return rows.finish();
}

EncodedDelta encode_delta(const std::string& codec, const std::string& params, const ModelFiles& ft,
                          const std::string& name, const ModelFiles& base, const std::string& src,
                          const std::vector<int64_t>& shape, int threads) {
    const uint64_t numel = uint64_t(numel_of(shape)), cols = uint64_t(Matrix::of(shape).cols);
    EncodedDelta r;
    if (numel == 0) {  // nothing to ask rows of: the empty array's encoding, and the base's CRC
        r.read = read_delta(ft, name, base, src, 0, nullptr, threads);
        r.enc = encode(codec, params, ArrayRef{nullptr, DType::F32, shape}, threads);
        return r;
    }
    const FileDeltaRows rows(ft, name, base, src, numel / cols, cols);
    r.enc = encode_rows(codec, params, rows, shape, threads);
    r.read = rows.finish();
    return r;
}

CheckpointOutput apply_checkpoint(const std::string& base, const std::string& delta, const std::string& out,
                                  const ApplyCheckpointOptions& o) {
    if (!o.dtype.empty() && o.dtype != "f32" && o.dtype != "f16" && o.dtype != "bf16")
        throw std::invalid_argument("dtype '" + o.dtype + "': use bf16, f16 or f32");
    check_alpha(o.alpha);
    std::shared_ptr<const ModelFiles> b = ModelFiles::open(base, o.follow_links);
    std::shared_ptr<const DeltaFile> d = DeltaFile::open(delta);
    CheckpointDelta c(b, d, o.force);
    auto out_dtype = [&](const CheckpointTensor& t) { return o.dtype.empty() ? t.dtype : t.output_dtype(dtype_from_name(o.dtype)); };

    // Each tensor goes to the shard of its base tensor (or of its source); added ones to the last shard.
    std::map<std::string, std::vector<const CheckpointTensor*>> layout;
    for (const std::string& s : b->shards()) layout[s];
    for (const CheckpointTensor& t : c.tensors()) {
        const std::string& shard = b->contains(t.name) ? b->shard_of(t.name)
                                   : (!t.source.empty() && b->contains(t.source)) ? b->shard_of(t.source)
                                                                                 : b->shards().back();
        layout[shard].push_back(&t);
    }
    // Everything that will be written is known before anything is: the output's place is checked first.
    const std::vector<KeptFile> kept = b->is_directory() ? config_files(c, o.dtype, o.follow_links) : std::vector<KeptFile>{};
    std::vector<std::string> writes;
    for (auto& kv : layout) writes.push_back(kv.first);
    if (b->has_index()) writes.push_back("model.safetensors.index.json");
    for (const KeptFile& f : kept) writes.push_back(f.name);
    check_output(out, b->is_directory() ? OutputKind::ModelDirectory : OutputKind::SafetensorsFile, {base, delta},
                 o.overwrite, writes);

    CheckpointOutput result{out, c.tensors().size(), 0};
    auto write_shard = [&](const std::string& path, const std::string& shard, bool replace) {
        std::vector<TensorInfo> infos;
        for (const CheckpointTensor* t : layout[shard]) infos.push_back(TensorInfo{t->name, out_dtype(*t), t->shape, 0, 0});
        std::map<std::string, std::string> meta = b->shard(shard).metadata();
        meta["format"] = "pt";
        SafetensorsWriter w(path, infos, meta, o.durable, replace);
        for (const CheckpointTensor* t : layout[shard]) {  // blocks are read, rebuilt and written on each thread
            const DType dt = out_dtype(*t);
            const uint64_t n = t->nbytes(dt);
            try {
                c.rebuild_blocks(
                    t->name, dt, o.alpha, o.threads,
                    [&](uint64_t at, const void* data, uint64_t size) { w.write_part(t->name, at, data, size); },
                    o.rounding);
            } catch (const std::bad_alloc&) {  // a large added tensor is rebuilt whole in memory
                throw std::system_error(ENOMEM, std::generic_category(),
                                        out + ": out of memory rebuilding tensor '" + t->name + "' (" +
                                            std::to_string(n) + " bytes)");
            }
            result.bytes += n;
            if (o.progress) o.progress(n);
        }
        w.finish();
    };

    if (!b->is_directory()) {
        write_shard(out, b->shards().front(), o.overwrite);
        return result;
    }
    AtomicDir dir(out, o.overwrite);
    try {
        json::Value weight_map = json::Value::make_object();
        std::map<std::string, std::string> sorted;
        for (auto& kv : layout) {
            write_shard(dir.tmp() + "/" + kv.first, kv.first, false);
            for (const CheckpointTensor* t : kv.second) sorted[t->name] = kv.first;
        }
        if (b->has_index()) {
            json::Value meta = json::parse(b->index_metadata());
            if (meta.kind != json::Value::Object) meta = json::Value::make_object();
            meta.set("total_size", json::Value::make_int(int64_t(result.bytes)));
            for (auto& kv : sorted) weight_map.obj.emplace_back(kv.first, json::Value::make_string(kv.second));
            json::Value index = json::Value::make_object();
            index.set("metadata", meta);
            index.set("weight_map", weight_map);
            write_file(dir.tmp() + "/model.safetensors.index.json", json::dump(index, 2));
        }
        for (const KeptFile& f : kept) write_file(dir.tmp() + "/" + f.name, f.data);
        dir.commit(o.durable);
    } catch (const std::system_error& ex) {
        const std::string tmp = dir.tmp();
        dir.abort();
        rethrow_named(ex, tmp, out);
    }
    return result;
}

}  // namespace deltapack
