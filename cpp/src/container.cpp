// The delta file: a safetensors file (memory-mapped, checked before use) whose __metadata__
// carries the deltapack manifest. See docs/FORMAT.md.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>

#include "codec.h"

namespace deltapack {

static constexpr int kFormatVersion = 2;     // written; version 1 files are still read
static constexpr int kOldestFormatVersion = 1;
static constexpr uint64_t kMaxHeader = 100u << 20;  // same bound as the safetensors reference reader

static const char* st_dtype(DType t) {
    switch (t) {
        case DType::F32: return "F32";
        case DType::F16: return "F16";
        case DType::BF16: return "BF16";
        case DType::F64: return "F64";
        case DType::I64: return "I64";
        case DType::I32: return "I32";
        case DType::I16: return "I16";
        case DType::I8: return "I8";
        case DType::U64: return "U64";
        case DType::U32: return "U32";
        case DType::U16: return "U16";
        case DType::U8: return "U8";
        case DType::BOOL: return "BOOL";
        case DType::F8_E4M3: return "F8_E4M3";
        case DType::F8_E5M2: return "F8_E5M2";
    }
    return "?";
}

struct DeltaFile::Entry {
    std::string codec, params;
    std::vector<int64_t> shape;
    DType dtype = DType::F32;
    std::vector<std::pair<std::string, ArrayRef>> components;
    uint32_t crc = 0;
    std::string checked_text;  // version >= 2: the entry text the CRC covers after the components
};

// Version 2's CRC covers, after the components, this text of the entry: {"codec","params","shape","dtype"}
// as the writer serialises JSON, so a flipped bit in a shape or parameter is caught like one in the data.
static std::string checked_entry_text(const std::string& codec, const json::Value& params,
                                      const std::vector<int64_t>& shape, DType dtype) {
    json::Value e = json::Value::make_object();
    e.set("codec", json::Value::make_string(codec));
    e.set("params", params);
    json::Value dims = json::Value::make_array();
    for (int64_t d : shape) dims.arr.push_back(json::Value::make_int(d));
    e.set("shape", dims);
    e.set("dtype", json::Value::make_string(dtype_name(dtype)));
    return json::dump(e);
}

static std::vector<int64_t> read_shape(const json::Value* v, const std::function<void(const std::string&)>& fail) {
    if (!v || v->kind != json::Value::Array) fail("shape must be an array");
    std::vector<int64_t> s;
    for (auto& d : v->arr) {
        if (d.kind != json::Value::Number || !d.is_integer || d.integer < 0) fail("shape entries must be integers >= 0");
        s.push_back(d.integer);
    }
    return s;
}

// numel * size with overflow detection; returns false on overflow.
static bool checked_nbytes(const std::vector<int64_t>& shape, size_t elem, uint64_t& out) {
    uint64_t n = elem;
    for (int64_t d : shape)
        if (__builtin_mul_overflow(n, uint64_t(d), &n)) return false;
    out = n;
    return true;
}

// ---------------------------------------------------------------------------- safetensors

SafetensorsFile::~SafetensorsFile() {
    if (mapped_) munmap(const_cast<uint8_t*>(map_), size_);
}

std::vector<std::string> SafetensorsFile::keys() const { return order_; }

const ArrayRef& SafetensorsFile::get(const std::string& name) const {
    auto it = arrays_.find(name);
    if (it == arrays_.end()) throw std::out_of_range(path_ + ": no tensor '" + name + "'");
    return it->second;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
    std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
    f->path_ = path;
    auto fail = [&](const std::string& msg) -> void { throw FormatError(path + ": " + msg); };

    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) { ::close(fd); fail(std::string("cannot stat: ") + std::strerror(errno)); }
    if (!S_ISREG(st.st_mode)) { ::close(fd); fail("not a regular file"); }
    f->size_ = size_t(st.st_size);
    if (f->size_ < 8) { ::close(fd); fail("truncated: " + std::to_string(f->size_) + " bytes is shorter than the 8-byte header length"); }
    void* m = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (m == MAP_FAILED) fail(std::string("cannot map: ") + std::strerror(errno));
    f->map_ = static_cast<const uint8_t*>(m);
    f->mapped_ = true;
    f->parse();
    return f;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::from_memory(const std::string& name, const uint8_t* data,
                                                              size_t size) {
    std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
    f->path_ = name;
    if (size < 8)
        throw FormatError(name + ": truncated: " + std::to_string(size) + " bytes is shorter than the 8-byte header length");
    f->map_ = data;
    f->size_ = size;
    f->parse();
    return f;
}

void SafetensorsFile::parse() {
    auto fail = [&](const std::string& msg) -> void { throw FormatError(path_ + ": " + msg); };
    uint64_t hlen = 0;
    for (int i = 0; i < 8; ++i) hlen |= uint64_t(map_[i]) << (8 * i);
    if (hlen > kMaxHeader) fail("corrupt header: header length " + std::to_string(hlen) + " exceeds the 100 MiB limit");
    if (hlen > size_ - 8)
        fail("truncated: header length " + std::to_string(hlen) + " runs past the end of the file (" +
             std::to_string(size_) + " bytes)");
    json::Value header;
    try {
        header = json::parse(std::string(reinterpret_cast<const char*>(map_ + 8), size_t(hlen)));
    } catch (const std::exception& ex) {
        fail(std::string("corrupt header: ") + ex.what());
    }
    if (header.kind != json::Value::Object) fail("corrupt header: not a JSON object");
    const uint8_t* data = map_ + 8 + hlen;
    const uint64_t data_size = size_ - 8 - hlen;

    std::vector<std::pair<std::pair<uint64_t, uint64_t>, std::string>> spans;
    for (auto& kv : header.obj) {
        if (kv.first == "__metadata__") {
            if (kv.second.kind != json::Value::Object) fail("corrupt header: __metadata__ is not an object");
            for (auto& mv : kv.second.obj) {
                if (mv.second.kind != json::Value::String) fail("corrupt header: __metadata__ values must be strings");
                metadata_[mv.first] = mv.second.str;
            }
            continue;
        }
        auto efail = [&](const std::string& m) { fail("corrupt header: tensor '" + kv.first + "': " + m); };
        const json::Value& t = kv.second;
        if (t.kind != json::Value::Object) efail("entry is not an object");
        const json::Value* dt = t.find("dtype");
        if (!dt || dt->kind != json::Value::String) efail("missing dtype");
        ArrayRef a;
        try {
            a.dtype = dtype_from_name(dt->str);
        } catch (const std::exception&) {
            efail("unsupported dtype '" + dt->str + "'");
        }
        a.shape = read_shape(t.find("shape"), efail);
        const json::Value* off = t.find("data_offsets");
        if (!off || off->kind != json::Value::Array || off->arr.size() != 2 || !off->arr[0].is_integer ||
            !off->arr[1].is_integer || off->arr[0].integer < 0 || off->arr[1].integer < off->arr[0].integer)
            efail("data_offsets must be [begin, end] with 0 <= begin <= end");
        uint64_t b = uint64_t(off->arr[0].integer), e = uint64_t(off->arr[1].integer), nbytes = 0;
        if (e > data_size)
            fail("truncated: tensor '" + kv.first + "' ends at byte " + std::to_string(e) + " of a " +
                 std::to_string(data_size) + "-byte data section");
        if (!checked_nbytes(a.shape, dtype_size(a.dtype), nbytes) || nbytes != e - b)
            efail("shape and dtype need " + std::to_string(nbytes) + " bytes but data_offsets span " +
                  std::to_string(e - b));
        a.data = const_cast<uint8_t*>(data + b);
        arrays_[kv.first] = a;
        spans.push_back({{b, e}, kv.first});
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i)
        if (spans[i].first.first < spans[i - 1].first.second)
            fail("corrupt header: the data of tensors '" + spans[i - 1].second + "' and '" + spans[i].second + "' overlap");
    for (auto& sp : spans) order_.push_back(sp.second);
}

// ---------------------------------------------------------------------------- delta files

DeltaFile::~DeltaFile() = default;

std::unique_ptr<DeltaFile> DeltaFile::open(const std::string& path) {
    std::unique_ptr<DeltaFile> f(new DeltaFile());
    f->path_ = path;
    f->file_ = SafetensorsFile::open(path);
    f->read_manifest();
    return f;
}

std::unique_ptr<DeltaFile> DeltaFile::from_memory(const std::string& name, const uint8_t* data, size_t size) {
    std::unique_ptr<DeltaFile> f(new DeltaFile());
    f->path_ = name;
    f->file_ = SafetensorsFile::from_memory(name, data, size);
    f->read_manifest();
    return f;
}

void DeltaFile::read_manifest() {
    const std::string& path = path_;
    auto fail = [&](const std::string& msg) -> void { throw FormatError(path + ": " + msg); };
    const SafetensorsFile& st = *file_;

    // The manifest.
    auto mit = st.metadata().find("deltapack");
    if (mit == st.metadata().end()) fail("not a deltapack file: the safetensors __metadata__ has no 'deltapack' manifest");
    manifest_ = mit->second;
    json::Value man;
    try {
        man = json::parse(manifest_);
    } catch (const std::exception& ex) {
        fail(std::string("corrupt manifest: ") + ex.what());
    }
    const json::Value* fmt = man.find("format");
    const json::Value* ver = man.find("version");
    if (!fmt || fmt->kind != json::Value::String || fmt->str != "deltapack") fail("corrupt manifest: format is not 'deltapack'");
    if (!ver || !ver->is_integer) fail("corrupt manifest: missing version");
    if (ver->integer < kOldestFormatVersion || ver->integer > kFormatVersion)
        fail("format version " + std::to_string(ver->integer) + " is not supported (this deltapack reads versions " +
             std::to_string(kOldestFormatVersion) + " to " + std::to_string(kFormatVersion) + ")");
    const bool entry_checked = ver->integer >= 2;
    const json::Value* tensors = man.find("tensors");
    if (!tensors || tensors->kind != json::Value::Object) fail("corrupt manifest: 'tensors' must be an object");
    std::set<std::string> referenced;  // "<tensor>:<component>" of every listed component
    for (auto& kv : tensors->obj) {
        const std::string& name = kv.first;
        auto tfail = [&](const std::string& m) { fail("tensor '" + name + "': " + m); };
        const json::Value& t = kv.second;
        if (t.kind != json::Value::Object) tfail("manifest entry is not an object");
        auto entry = std::make_shared<Entry>();
        const json::Value* codec = t.find("codec");
        if (!codec || codec->kind != json::Value::String) tfail("missing codec");
        entry->codec = codec->str;
        try {
            find_codec(entry->codec);
        } catch (const std::invalid_argument& ex) {
            tfail(ex.what());
        }
        const json::Value* params = t.find("params");
        if (!params || params->kind != json::Value::Object) tfail("params must be an object");
        entry->params = json::dump(*params);
        try {  // stored params are canonical: every parameter present (a missing one must not become a default)
            for (auto& kv : json::parse(canonical_params(entry->codec, entry->params)).obj)
                if (!params->find(kv.first)) tfail("parameter '" + kv.first + "' is missing from its params");
        } catch (const std::invalid_argument& ex) {
            tfail(ex.what());
        }
        entry->shape = read_shape(t.find("shape"), tfail);
        const json::Value* dt = t.find("dtype");
        if (!dt || dt->kind != json::Value::String) tfail("missing dtype");
        try {
            entry->dtype = dtype_from_name(dt->str);
        } catch (const std::exception&) {
            tfail("unsupported dtype '" + dt->str + "'");
        }
        if (!is_float_dtype(entry->dtype)) tfail("dtype '" + dt->str + "' is not f32, f16 or bf16");
        const json::Value* comps = t.find("components");
        if (!comps || comps->kind != json::Value::Array) tfail("components must be an array");
        std::set<std::string> listed;
        for (auto& c : comps->arr) {
            if (c.kind != json::Value::String) tfail("component names must be strings");
            const std::string key = name + ":" + c.str;
            if (!st.contains(key)) tfail("component '" + c.str + "' is listed but not stored");
            if (!listed.insert(c.str).second) tfail("component '" + c.str + "' is listed twice");
            referenced.insert(key);
            const ArrayRef& a = st.get(key);
            // Decoders read components through typed pointers: they must be aligned.
            if (reinterpret_cast<uintptr_t>(a.data) % dtype_size(a.dtype) != 0)
                tfail("component '" + c.str + "' is not aligned to its element size");
            entry->components.emplace_back(c.str, a);
        }
        const json::Value* crc = t.find("crc32c");
        if (!crc || crc->kind != json::Value::String || crc->str.size() != 8 ||
            crc->str.find_first_not_of("0123456789abcdef") != std::string::npos)
            tfail("crc32c must be 8 lowercase hex digits");
        entry->crc = uint32_t(std::stoul(crc->str, nullptr, 16));
        if (entry_checked) entry->checked_text = checked_entry_text(entry->codec, *params, entry->shape, entry->dtype);
        order_.push_back(name);
        entries_[name] = entry;
    }
    // Every stored array belongs to a listed tensor: components left behind by a tensor missing from the
    // manifest mean a damaged manifest, not a smaller delta.
    for (const std::string& key : st.keys())
        if (!referenced.count(key)) fail("stored array '" + key + "' belongs to no tensor of the manifest");
}

std::vector<std::string> DeltaFile::keys() const { return order_; }

bool DeltaFile::contains(const std::string& name) const { return entries_.count(name) != 0; }

EncodedRef DeltaFile::get(const std::string& name, bool verify) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) throw std::out_of_range(path_ + ": no tensor '" + name + "' in this delta file");
    const Entry& e = *it->second;
    EncodedRef ref;
    ref.name = name;
    ref.codec = e.codec;
    ref.params = e.params;
    ref.shape = e.shape;
    ref.dtype = e.dtype;
    uint32_t crc = 0;
    for (auto& c : e.components) {
        ref.components[c.first] = c.second;
        if (verify) crc = crc32c(c.second.data, c.second.nbytes(), crc);
    }
    if (verify) crc = crc32c(e.checked_text.data(), e.checked_text.size(), crc);
    if (verify && crc != e.crc) {
        char buf[96];
        std::snprintf(buf, sizeof buf, "checksum mismatch (stored %08x, computed %08x)", e.crc, crc);
        throw FormatError(path_ + ": tensor '" + name + "': " + buf + "; the file is corrupt");
    }
    try {
        validate(ref);
    } catch (const FormatError& ex) {
        throw FormatError(path_ + ": " + ex.what());
    }
    return ref;
}

// ---------------------------------------------------------------------------- writing

static void write_all(FILE* fp, const void* p, size_t n, const std::string& tmp) {
    if (n && std::fwrite(p, 1, n, fp) != n)
        throw std::runtime_error("cannot write " + tmp + ": " + std::strerror(errno));
}

void save(const std::string& path, const std::vector<EncodedRef>& tensors, const std::string& extra_manifest) {
    json::Value extra;
    try {
        extra = json::parse(extra_manifest.empty() ? "{}" : extra_manifest);
    } catch (const std::exception& ex) {
        throw std::invalid_argument(std::string("save: extra manifest is not valid JSON: ") + ex.what());
    }
    if (extra.kind != json::Value::Object) throw std::invalid_argument("save: extra manifest must be a JSON object");

    struct Item { std::string key; const ArrayRef* a; };
    std::vector<Item> items;
    json::Value man = json::Value::make_object();
    man.set("format", json::Value::make_string("deltapack"));
    man.set("version", json::Value::make_int(kFormatVersion));
    man.set("tool", json::Value::make_string("deltapack " DELTAPACK_VERSION));
    for (auto& kv : extra.obj)
        if (kv.first != "format" && kv.first != "version" && kv.first != "tool" && kv.first != "tensors")
            man.set(kv.first, kv.second);
    json::Value& tmap = man.set("tensors", json::Value::make_object());
    std::set<std::string> names;  // a set, not the object's linear lookup: many tensors stay linearithmic
    for (const EncodedRef& t : tensors) {
        if (t.name.empty()) throw std::invalid_argument("save: a tensor has an empty name");
        if (!names.insert(t.name).second) throw std::invalid_argument("save: tensor '" + t.name + "' is listed twice");
        validate(t);
        json::Value e = json::Value::make_object();
        e.set("codec", json::Value::make_string(t.codec));
        json::Value params = json::parse(canonical_params(t.codec, t.params));
        e.set("params", params);
        json::Value shape = json::Value::make_array();
        for (int64_t d : t.shape) shape.arr.push_back(json::Value::make_int(d));
        e.set("shape", shape);
        e.set("dtype", json::Value::make_string(dtype_name(t.dtype)));
        json::Value comps = json::Value::make_array();
        uint32_t crc = 0;
        for (auto& c : t.components) {
            comps.arr.push_back(json::Value::make_string(c.first));
            crc = crc32c(c.second.data, c.second.nbytes(), crc);
            items.push_back({t.name + ":" + c.first, &c.second});
        }
        const std::string checked = checked_entry_text(t.codec, params, t.shape, t.dtype);
        crc = crc32c(checked.data(), checked.size(), crc);
        e.set("components", comps);
        char hex[9];
        std::snprintf(hex, sizeof hex, "%08x", crc);
        e.set("crc32c", json::Value::make_string(hex));
        tmap.obj.emplace_back(t.name, std::move(e));
    }
    std::vector<std::pair<std::string, ArrayRef>> arrays;
    for (auto& it : items) arrays.emplace_back(it.key, *it.a);
    write_safetensors(path, arrays, {{"deltapack", json::dump(man)}});
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, ArrayRef>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
    // Larger elements first keeps every tensor aligned to its element size.
    std::vector<const std::pair<std::string, ArrayRef>*> items;
    for (auto& t : tensors) items.push_back(&t);
    std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) {
        return dtype_size(a->second.dtype) > dtype_size(b->second.dtype);
    });
    json::Value header = json::Value::make_object();
    if (!metadata.empty()) {
        json::Value meta = json::Value::make_object();
        for (auto& kv : metadata) meta.set(kv.first, json::Value::make_string(kv.second));
        header.set("__metadata__", meta);
    }
    uint64_t off = 0;
    std::set<std::string> names;
    for (auto* it : items) {
        if (it->first == "__metadata__" || !names.insert(it->first).second)
            throw std::invalid_argument("write_safetensors: tensor name '" + it->first + "' is reserved or repeated");
        json::Value e = json::Value::make_object();
        e.set("dtype", json::Value::make_string(st_dtype(it->second.dtype)));
        json::Value shape = json::Value::make_array();
        for (int64_t d : it->second.shape) shape.arr.push_back(json::Value::make_int(d));
        e.set("shape", shape);
        json::Value offs = json::Value::make_array();
        offs.arr.push_back(json::Value::make_int(int64_t(off)));
        off += it->second.nbytes();
        offs.arr.push_back(json::Value::make_int(int64_t(off)));
        e.set("data_offsets", offs);
        header.obj.emplace_back(it->first, std::move(e));
    }
    std::string htext = json::dump(header);
    htext.append((8 - htext.size() % 8) % 8, ' ');

    std::random_device rd;
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, ".tmp%08x", unsigned(rd()));
    const std::string tmp = path + suffix;
    FILE* fp = std::fopen(tmp.c_str(), "wb");
    if (!fp) throw std::runtime_error("cannot create " + tmp + ": " + std::strerror(errno));
    try {
        uint8_t len[8];
        for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(htext.size()) >> (8 * i));
        write_all(fp, len, 8, tmp);
        write_all(fp, htext.data(), htext.size(), tmp);
        for (auto* it : items) write_all(fp, it->second.data, it->second.nbytes(), tmp);
        if (std::fflush(fp) != 0 || fsync(fileno(fp)) != 0)
            throw std::runtime_error("cannot write " + tmp + ": " + std::strerror(errno));
        if (std::fclose(fp) != 0) { fp = nullptr; throw std::runtime_error("cannot close " + tmp + ": " + std::strerror(errno)); }
        fp = nullptr;
        if (std::rename(tmp.c_str(), path.c_str()) != 0)
            throw std::runtime_error("cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
        // Make the rename itself durable.
        const size_t slash = path.find_last_of('/');
        const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
        int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) { fsync(dfd); ::close(dfd); }
    } catch (...) {
        if (fp) std::fclose(fp);
        std::remove(tmp.c_str());
        throw;
    }
}

}  // namespace deltapack
