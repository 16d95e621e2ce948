// The delta file: a safetensors file (read with pread, checked before use) whose __metadata__
// carries the deltapack manifest. See docs/FORMAT.md.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <mutex>
#include <set>
#include <system_error>

#include "codec.h"

namespace deltapack {

static constexpr int kFormatVersion = 2;     // written; version 1 files are still read
static constexpr int kOldestFormatVersion = 1;
static constexpr uint64_t kMaxHeader = 100000000;  // bytes: the safetensors reference reader's bound

const char* safetensors_dtype_name(DType t) {
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
    std::vector<std::pair<std::string, TensorInfo>> components;  // name, where it is stored
    uint64_t stored_bytes = 0;
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

// ---------------------------------------------------------------------------- system calls

// An OSError for Python (the bindings translate std::system_error): errno, then "<what>: <reason>".
[[noreturn]] static void os_fail(int err, const std::string& what) {
    const bool full = err == ENOSPC || err == EDQUOT || err == EFBIG;
    throw std::system_error(err, std::generic_category(), what + (full ? ": disk full" : ""));
}

// What every writer says when it will not replace `path` (check_output says the same before any work).
[[noreturn]] static void already_exists(const std::string& path) {
    throw std::system_error(EEXIST, std::generic_category(), path + " already exists (use --overwrite to replace it)");
}

static std::string dir_of(const std::string& path) {
    const size_t slash = path.find_last_of('/');
    return slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
}

static void fsync_dir(const std::string& dir) {
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) { ::fsync(dfd); ::close(dfd); }
}

// write() at the file position, or pwrite() at `offset` when it is given, until all n bytes are out.
static void write_fd(int fd, const void* data, size_t n, const std::string& path, int64_t offset = -1) {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n) {
        const size_t m = std::min<size_t>(n, size_t(1) << 30);
        const ssize_t got = offset < 0 ? ::write(fd, p, m) : ::pwrite(fd, p, m, off_t(offset));
        if (got < 0) {
            if (errno == EINTR) continue;
            os_fail(errno, "writing " + path);
        }
        p += got, n -= size_t(got);
        if (offset >= 0) offset += got;
    }
}

// pread until `n` bytes are in; a short file is a FormatError (the header promised more).
static void pread_fd(int fd, void* out, uint64_t n, uint64_t offset, const std::string& path) {
    auto* p = static_cast<uint8_t*>(out);
    while (n) {
        const ssize_t got = ::pread(fd, p, std::min<uint64_t>(n, uint64_t(1) << 30), off_t(offset));
        if (got < 0) {
            if (errno == EINTR) continue;
            os_fail(errno, "reading " + path);
        }
        if (got == 0) throw FormatError(path + ": file ends early (truncated?) at byte " + std::to_string(offset));
        p += got, n -= uint64_t(got), offset += uint64_t(got);
    }
}

static int open_read(const std::string& path, struct stat& st) {
    // O_NONBLOCK: opening a FIFO does not wait for a writer (it is refused below, as any non-regular file).
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) os_fail(errno, path + ": cannot open");
    if (fstat(fd, &st) != 0) { const int err = errno; ::close(fd); os_fail(err, path + ": cannot stat"); }
    if (S_ISDIR(st.st_mode)) { ::close(fd); os_fail(EISDIR, path + ": cannot read"); }
    if (!S_ISREG(st.st_mode)) { ::close(fd); throw FormatError(path + ": not a regular file"); }
    return fd;
}

// ---------------------------------------------------------------------------- safetensors

SafetensorsFile::~SafetensorsFile() {
    if (fd_ >= 0) ::close(fd_);
}

std::vector<std::string> SafetensorsFile::keys() const { return order_; }

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
    auto it = infos_.find(name);
    if (it == infos_.end()) throw std::out_of_range(path_ + ": no tensor '" + name + "'");
    return it->second;
}

const ArrayRef& SafetensorsFile::get(const std::string& name) const {
    auto it = arrays_.find(name);
    if (it == arrays_.end()) {
        if (infos_.count(name)) throw std::logic_error(path_ + ": not in memory (opened with open()); use read()");
        throw std::out_of_range(path_ + ": no tensor '" + name + "'");
    }
    return it->second;
}

static int64_t mtime_ns(const struct stat& st) { return int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec; }

// A file read with pread must still be the file open() checked: the same size and modification time (the bytes
// of a file truncated or rewritten in place, as `cp new old` does, are not what the header described).
void SafetensorsFile::check_unchanged(const std::string& name) const {
    struct stat st;
    if (::fstat(fd_, &st) != 0) os_fail(errno, "reading " + path_);
    if (uint64_t(st.st_size) == size_ && mtime_ns(st) == mtime_ns_) return;
    throw FormatError(path_ + ": tensor '" + name + "': the file was " +
                      (uint64_t(st.st_size) < size_ ? "truncated" : "modified") + " while it was being read (" +
                      (uint64_t(st.st_size) != size_ ? "its size went from " + std::to_string(size_) + " to " +
                                                           std::to_string(st.st_size) + " bytes"
                                                     : std::string("a new modification time")) +
                      ")");
}

void SafetensorsFile::read(const std::string& name, void* out, uint64_t nbytes, uint64_t first_byte) const {
    const TensorInfo& t = info(name);
    if (first_byte > t.nbytes || nbytes > t.nbytes - first_byte)
        throw std::invalid_argument(path_ + ": tensor '" + name + "': bytes [" + std::to_string(first_byte) + ", +" +
                                    std::to_string(nbytes) + ") fall outside its " + std::to_string(t.nbytes) + " bytes");
    if (data_) {
        std::memcpy(out, data_ + t.offset + first_byte, size_t(nbytes));
        return;
    }
    try {
        pread_fd(fd_, out, nbytes, t.offset + first_byte, path_);
    } catch (const FormatError&) {  // it ended early: say whether it changed
        check_unchanged(name);
        throw;
    }
    check_unchanged(name);
}

static uint64_t header_length(const uint8_t* p) {
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= uint64_t(p[i]) << (8 * i);
    return n;
}

static void check_header_length(const std::string& path, uint64_t hlen, uint64_t size) {
    if (size < 8)
        throw FormatError(path + ": truncated: " + std::to_string(size) + " bytes is shorter than the 8-byte header length");
    if (hlen > kMaxHeader)
        throw FormatError(path + ": corrupt header: header length " + std::to_string(hlen) + " exceeds the safetensors limit of 100000000 bytes");
    if (hlen > size - 8)
        throw FormatError(path + ": truncated: header length " + std::to_string(hlen) +
                          " runs past the end of the file (" + std::to_string(size) + " bytes)");
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
    auto f = start(path, false);
    f->check_layout();
    return f;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::load(const std::string& path) {
    auto f = start(path, true);
    f->check_layout();
    return f;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::from_memory(const std::string& name, const uint8_t* data,
                                                              size_t size) {
    auto f = wrap(name, data, size);
    f->check_layout();
    return f;
}

void SafetensorsFile::check_layout() const {
    if (!layout_problem_.empty()) throw FormatError(path_ + ": corrupt header: " + layout_problem_);
}

// The header read and parsed (layout not yet reported); the file kept open for read(), or read whole (in_memory).
std::unique_ptr<SafetensorsFile> SafetensorsFile::start(const std::string& path, bool in_memory) {
    std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
    f->path_ = path;
    struct stat st;
    f->fd_ = open_read(path, st);
    f->size_ = uint64_t(st.st_size);
    f->mtime_ns_ = mtime_ns(st);
    if (in_memory) {
        f->owned_.resize(size_t(f->size_));
        pread_fd(f->fd_, f->owned_.data(), f->size_, 0, path);
        ::close(f->fd_);
        f->fd_ = -1;
        f->data_ = f->owned_.data();
        if (f->size_ < 8) check_header_length(path, 0, f->size_);
        const uint64_t hlen = header_length(f->data_);
        check_header_length(path, hlen, f->size_);
        f->parse(f->data_ + 8, hlen, f->size_);
        return f;
    }
    uint8_t len[8] = {};
    if (f->size_ >= 8) pread_fd(f->fd_, len, 8, 0, path);
    const uint64_t hlen = header_length(len);
    check_header_length(path, hlen, f->size_);
    std::string text(size_t(hlen), '\0');
    pread_fd(f->fd_, &text[0], hlen, 8, path);
    f->parse(reinterpret_cast<const uint8_t*>(text.data()), hlen, f->size_);
    return f;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::wrap(const std::string& name, const uint8_t* data, size_t size) {
    std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
    f->path_ = name;
    if (size < 8) check_header_length(name, 0, size);
    f->data_ = data;
    f->size_ = size;
    const uint64_t hlen = header_length(data);
    check_header_length(name, hlen, size);
    f->parse(data + 8, hlen, size);
    return f;
}

void SafetensorsFile::parse(const uint8_t* htext, uint64_t hlen, uint64_t file_size) {
    auto fail = [&](const std::string& msg) -> void { throw FormatError(path_ + ": " + msg); };
    json::Value header;
    try {
        header = json::parse(std::string(reinterpret_cast<const char*>(htext), size_t(hlen)));
    } catch (const std::exception& ex) {
        fail(std::string("corrupt header: ") + ex.what());
    }
    if (header.kind != json::Value::Object) fail("corrupt header: not a JSON object");
    const uint64_t data_start = 8 + hlen, data_size = file_size - data_start;

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
        TensorInfo info;
        info.name = kv.first;
        try {
            info.dtype = dtype_from_name(dt->str);
        } catch (const std::exception&) {
            efail("unsupported dtype '" + dt->str + "'");
        }
        if (dt->str != safetensors_dtype_name(info.dtype))  // safetensors spells dtypes one way only
            efail("dtype '" + dt->str + "' is not a safetensors dtype (did you mean '" +
                  safetensors_dtype_name(info.dtype) + "'?)");
        info.shape = read_shape(t.find("shape"), efail);
        const json::Value* off = t.find("data_offsets");
        if (!off || off->kind != json::Value::Array || off->arr.size() != 2 || !off->arr[0].is_integer ||
            !off->arr[1].is_integer || off->arr[0].integer < 0 || off->arr[1].integer < off->arr[0].integer)
            efail("data_offsets must be [begin, end] with 0 <= begin <= end");
        uint64_t b = uint64_t(off->arr[0].integer), e = uint64_t(off->arr[1].integer), nbytes = 0;
        if (e > data_size)
            fail("truncated: tensor '" + kv.first + "' ends at byte " + std::to_string(e) + " of a " +
                 std::to_string(data_size) + "-byte data section");
        if (!checked_nbytes(info.shape, dtype_size(info.dtype), nbytes) || nbytes != e - b)
            efail("shape and dtype need " + std::to_string(nbytes) + " bytes but data_offsets span " +
                  std::to_string(e - b));
        info.offset = data_start + b;
        info.nbytes = nbytes;
        if (data_) arrays_[kv.first] = ArrayRef{const_cast<uint8_t*>(data_ + info.offset), info.dtype, info.shape};
        infos_[kv.first] = std::move(info);
        spans.push_back({{b, e}, kv.first});
    }
    // As safetensors requires: the tensors' bytes tile the data section, back to back from its start to
    // the end of the file (no overlap, no gap, nothing after).
    // Overlaps fail at once. Gaps and trailing bytes are safe to read around, so they are noted and reported by
    // check_layout(), after a delta file's manifest checks, which name the tensor when a component went missing.
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i)
        if (spans[i].first.first < spans[i - 1].first.second)
            fail("corrupt header: the data of tensors '" + spans[i - 1].second + "' and '" + spans[i].second + "' overlap");
    uint64_t end = 0;
    for (auto& sp : spans) {
        if (sp.first.first > end && layout_problem_.empty())
            layout_problem_ = std::to_string(sp.first.first - end) + " bytes before tensor '" + sp.second +
                              "' belong to no tensor (safetensors data is contiguous)";
        end = sp.first.second;
    }
    if (end != data_size && layout_problem_.empty())
        layout_problem_ = "the tensors end at byte " + std::to_string(end) + " of a " + std::to_string(data_size) +
                          "-byte data section (safetensors data is contiguous and ends the file)";
    for (auto& sp : spans) order_.push_back(sp.second);
}

// ---------------------------------------------------------------------------- delta files

// Memory for the tensors read from a file, handed back when a DeltaTensor is released and kept (two buffers at
// most) for the next read: memory the kernel has already given costs nothing to fill again, while a fresh buffer
// for every tensor of a large delta cost apply ~10 % in page faults and zeroing. Shared with the buffers it hands
// out, so a DeltaTensor may outlive its file.
struct DeltaFile::Buffers : std::enable_shared_from_this<DeltaFile::Buffers> {
    static constexpr size_t kKept = 2, kHuge = size_t(2) << 20;
    std::mutex mu;
    std::vector<std::pair<size_t, void*>> kept;  // (size, memory)

    ~Buffers() {
        for (auto& b : kept) std::free(b.second);
    }
    std::shared_ptr<void> take(size_t n) {
        std::shared_ptr<Buffers> self = shared_from_this();
        {
            std::lock_guard<std::mutex> lock(mu);
            auto best = kept.end();
            for (auto it = kept.begin(); it != kept.end(); ++it)
                if (it->first >= n && (best == kept.end() || it->first < best->first)) best = it;
            if (best != kept.end()) {
                const std::pair<size_t, void*> b = *best;
                kept.erase(best);
                return std::shared_ptr<void>(b.second, [self, size = b.first](void* p) { self->give(size, p); });
            }
        }
        // Large buffers in whole huge pages where the kernel offers them (fewer page faults to fill them).
        const size_t align = n >= kHuge ? kHuge : 64, size = (n + align - 1) / align * align;
        void* mem = std::aligned_alloc(align, size);
        if (!mem) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
        if (align == kHuge) ::madvise(mem, size, MADV_HUGEPAGE);
#endif
        return std::shared_ptr<void>(mem, [self, size](void* p) { self->give(size, p); });
    }
    void give(size_t size, void* p) {
        std::lock_guard<std::mutex> lock(mu);
        kept.emplace_back(size, p);
        if (kept.size() > kKept) {  // the smallest goes
            auto small = std::min_element(kept.begin(), kept.end());
            std::free(small->second);
            kept.erase(small);
        }
    }
};

DeltaFile::~DeltaFile() = default;

std::unique_ptr<DeltaFile> DeltaFile::open(const std::string& path, bool in_memory) {
    std::unique_ptr<DeltaFile> f(new DeltaFile());
    f->path_ = path;
    f->buffers_ = std::make_shared<Buffers>();
    try {
        f->file_ = SafetensorsFile::start(path, in_memory);
    } catch (const std::system_error& ex) {  // a delta file that cannot be opened is reported as unreadable
        throw FormatError(std::string(ex.what()));
    }
    f->read_manifest();
    f->file_->check_layout();
    return f;
}

std::unique_ptr<DeltaFile> DeltaFile::from_memory(const std::string& name, const uint8_t* data, size_t size) {
    std::unique_ptr<DeltaFile> f(new DeltaFile());
    f->path_ = name;
    f->file_ = SafetensorsFile::wrap(name, data, size);
    f->read_manifest();
    f->file_->check_layout();
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
    if (man.kind != json::Value::Object) fail("corrupt manifest: not a JSON object");
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
            const TensorInfo& a = st.info(key);
            // Decoders read components through typed pointers: they must be aligned (in the file, and in memory
            // when the file is read into caller memory).
            if ((reinterpret_cast<uintptr_t>(st.data_) + a.offset) % dtype_size(a.dtype) != 0)
                tfail("component '" + c.str + "' is not aligned to its element size");
            if (!plausible_shape(a.shape)) tfail("component '" + c.str + "' has an implausibly large shape");
            entry->components.emplace_back(c.str, a);
            entry->stored_bytes += a.nbytes;
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
    // The kept files' bytes: one U8 array that the checkpoint record's `bytes` ranges lie in (checked below).
    uint64_t stored_files = 0;
    if (st.contains(kFilesKey)) {
        const TensorInfo& a = st.info(kFilesKey);
        if (a.dtype != DType::U8 || a.shape.size() != 1)
            fail(std::string("stored array '") + kFilesKey + "' (the kept files' bytes) must be a 1-d U8 array");
        stored_files = a.nbytes;
        referenced.insert(kFilesKey);
    }
    // Every stored array belongs to a listed tensor: components left behind by a tensor missing from the
    // manifest mean a damaged manifest, not a smaller delta.
    for (const std::string& key : st.keys())
        if (!referenced.count(key)) fail("stored array '" + key + "' belongs to no tensor of the manifest");
    // What deltapack itself reads from the metadata and the base fingerprint has the types it expects.
    check_manifest_fields(man, path_, stored_files);
}

std::vector<std::string> DeltaFile::keys() const { return order_; }

std::string DeltaFile::stored_file(uint64_t begin, uint64_t end) const {
    if (end < begin || !file_->contains(kFilesKey))
        throw FormatError(path_ + ": no stored bytes [" + std::to_string(begin) + ", " + std::to_string(end) + ")");
    std::string out(size_t(end - begin), '\0');
    file_->read(kFilesKey, &out[0], end - begin, begin);  // FormatError if the range leaves the array
    return out;
}

bool DeltaFile::contains(const std::string& name) const { return entries_.count(name) != 0; }

const DeltaFile::Entry& DeltaFile::entry_of(const std::string& name) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) throw std::out_of_range(path_ + ": no tensor '" + name + "' in this delta file");
    return *it->second;
}

const std::vector<int64_t>& DeltaFile::shape(const std::string& name) const { return entry_of(name).shape; }

uint64_t DeltaFile::stored_bytes(const std::string& name) const { return entry_of(name).stored_bytes; }

EncodedRef DeltaFile::entry(const std::string& name) const {
    const Entry& e = entry_of(name);
    EncodedRef ref;
    ref.name = name;
    ref.codec = e.codec;
    ref.params = e.params;
    ref.shape = e.shape;
    ref.dtype = e.dtype;
    return ref;
}

DeltaTensor DeltaFile::get(const std::string& name, bool verify) const {
    const Entry& e = entry_of(name);
    DeltaTensor t;
    t.ref = entry(name);
    // A file on disk: its components are read into memory of their own (each 64-byte aligned), never mapped.
    uint8_t* buf = nullptr;
    if (!file_->in_memory()) {
        uint64_t total = 64;
        for (auto& c : e.components) total += (c.second.nbytes + 63) / 64 * 64;
        t.bytes = buffers_->take(size_t(total));
        buf = static_cast<uint8_t*>(t.bytes.get());
    }
    uint32_t crc = 0;
    uint64_t at = 0;
    for (auto& c : e.components) {
        const TensorInfo& info = c.second;
        void* data;
        if (buf) {
            data = buf + at;
            file_->read(info.name, data, info.nbytes);
            at += (info.nbytes + 63) / 64 * 64;
        } else {
            data = file_->get(info.name).data;
        }
        t.ref.components[c.first] = ArrayRef{data, info.dtype, info.shape};
        if (verify) crc = crc32c(data, size_t(info.nbytes), crc);
    }
    if (verify) crc = crc32c(e.checked_text.data(), e.checked_text.size(), crc);
    if (verify && crc != e.crc) {
        char msg[96];
        std::snprintf(msg, sizeof msg, "checksum mismatch (stored %08x, computed %08x)", e.crc, crc);
        throw FormatError(path_ + ": tensor '" + name + "': " + msg + "; the file is corrupt");
    }
    try {
        validate(t.ref);
    } catch (const FormatError& ex) {
        throw FormatError(path_ + ": " + ex.what());
    }
    return t;
}

// ---------------------------------------------------------------------------- atomic files

// linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH on some kernels; /proc/self/fd works without it.
static int link_fd(int fd, const std::string& path) {
    if (::linkat(fd, "", AT_FDCWD, path.c_str(), AT_EMPTY_PATH) == 0) return 0;
    const std::string proc = "/proc/self/fd/" + std::to_string(fd);
    return ::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW);
}

// Whether an O_TMPFILE in `dir` can later be given a name: probed once per directory, so a file system
// without it (or without /proc) falls back to a temporary name before any data is written.
static bool tmpfile_linkable(const std::string& dir) {
    static std::mutex mu;
    static std::map<std::string, bool> known;
    std::lock_guard<std::mutex> lock(mu);
    auto it = known.find(dir);
    if (it != known.end()) return it->second;
    bool ok = false;
    const int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) return false;  // e.g. no such dir yet
    if (fd >= 0) {
        std::random_device rd;
        const std::string probe = dir + "/.deltapack-probe-" + std::to_string(::getpid()) + "-" + std::to_string(rd());
        ok = link_fd(fd, probe) == 0;
        if (ok) ::unlink(probe.c_str());
        ::close(fd);
    }
    return known[dir] = ok;
}

static std::string temp_name(const std::string& path) {
    std::random_device rd;
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, ".tmp%08x", unsigned(rd()));
    return path + suffix;
}

AtomicFile::AtomicFile(const std::string& path, bool replace) : path_(path), dir_(dir_of(path)), replace_(replace) {
    if (tmpfile_linkable(dir_)) fd_ = ::open(dir_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644);
    if (fd_ < 0) {
        tmpname_ = temp_name(path_);
        fd_ = ::open(tmpname_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0644);
        if (fd_ < 0) {
            const int err = errno;
            tmpname_.clear();
            os_fail(err, "cannot create " + path_);
        }
    }
}

AtomicFile::~AtomicFile() { abort(); }

std::string AtomicFile::reopen_path() const {
    if (fd_ < 0) throw std::logic_error(path_ + ": reopened after commit or abort");
    return tmpname_.empty() ? "/proc/self/fd/" + std::to_string(fd_) : tmpname_;
}

void AtomicFile::write(const void* data, size_t n) {
    if (fd_ < 0) throw std::logic_error(path_ + ": written after commit or abort");
    write_fd(fd_, data, n, path_);
    written_ += n;
}

void AtomicFile::write_at(uint64_t offset, const void* data, size_t n) {
    if (fd_ < 0) throw std::logic_error(path_ + ": written after commit or abort");
    write_fd(fd_, data, n, path_, int64_t(offset));
}

void AtomicFile::commit(bool durable) {
    if (fd_ < 0) throw std::logic_error(path_ + ": committed twice or after abort");
    if (durable && ::fsync(fd_) != 0) os_fail(errno, "writing " + path_);
    bool linked = false;
    if (tmpname_.empty()) {  // unnamed: a new name is linked directly, so nothing else is ever visible
        if (link_fd(fd_, path_) == 0) {
            linked = true;
        } else if (errno == EEXIST && !replace_) {
            already_exists(path_);
        } else if (errno == EEXIST) {  // replacing a file takes a temporary name and a rename
            tmpname_ = temp_name(path_);
            if (link_fd(fd_, tmpname_) != 0) {
                const int err = errno;
                tmpname_.clear();
                os_fail(err, "cannot link " + path_);
            }
        } else {
            os_fail(errno, "cannot link " + path_);
        }
    }
    ::close(fd_);
    fd_ = -1;
    if (!linked && !replace_) {  // a named temporary: link() refuses an existing name, rename() would replace it
        if (::link(tmpname_.c_str(), path_.c_str()) != 0) {
            const int err = errno;
            abort();
            if (err == EEXIST) already_exists(path_);
            os_fail(err, "cannot link " + path_);
        }
        ::unlink(tmpname_.c_str());
        linked = true;
    }
    if (!linked && ::rename(tmpname_.c_str(), path_.c_str()) != 0) {
        const int err = errno;
        const std::string tmp = tmpname_;
        ::unlink(tmp.c_str());
        tmpname_.clear();
        os_fail(err, "cannot rename " + tmp + " to " + path_);
    }
    tmpname_.clear();
    if (durable) fsync_dir(dir_);
}

void AtomicFile::abort() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!tmpname_.empty()) ::unlink(tmpname_.c_str());
    tmpname_.clear();
}

void AtomicFile::start_writeback() {
#ifdef POSIX_FADV_DONTNEED
    if (fd_ >= 0) ::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED);  // on dirty pages: starts their writeback
#endif
}

int AtomicFile::scratch(const std::string& dir) {
    int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0) return fd;
    std::string name = dir + "/.deltapack-spill-XXXXXX";
    fd = ::mkostemp(&name[0], O_CLOEXEC);
    if (fd < 0) os_fail(errno, "cannot create a scratch file in " + dir);
    ::unlink(name.c_str());  // still readable through the descriptor; nothing is left behind
    return fd;
}

// ---------------------------------------------------------------------------- atomic directories

// rename(from, to) that never replaces an existing `to` (renameat2 RENAME_NOREPLACE where the kernel and file
// system have it; elsewhere rename(), which still refuses a non-empty directory).
static int rename_new(const std::string& from, const std::string& to) {
#ifdef RENAME_NOREPLACE
    if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return 0;
    if (errno != EINVAL && errno != ENOSYS) return -1;
#endif
    return ::rename(from.c_str(), to.c_str());
}

static const char kDirTmp[] = ".deltapack-tmp-";

// Whether `path` can be a temporary directory of ours (or an old output moved aside): a real directory, not a
// link, owned by this user, holding regular files only. Nothing else is removed as a leftover of a killed run.
static bool our_flat_dir(const std::string& path) {
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::getuid()) return false;
    std::error_code ec;
    for (auto& entry : std::filesystem::directory_iterator(path, ec)) {
        struct stat es;
        if (::lstat(entry.path().c_str(), &es) != 0 || !S_ISREG(es.st_mode)) return false;
    }
    return !ec;
}

AtomicDir::AtomicDir(const std::string& path, bool overwrite) : overwrite_(overwrite) {
    namespace fs = std::filesystem;
    path_ = output_path(path);  // where check_output looked: its folder resolved as the kernel resolves it
    std::error_code ec;
    struct stat st;
    if (::lstat(path_.c_str(), &st) == 0 && !overwrite) already_exists(path);
    const fs::path parent = fs::path(path_).parent_path();
    const std::string leaf = fs::path(path_).filename().string();
    fs::create_directories(parent, ec);
    if (ec) throw std::system_error(ec, "cannot create " + parent.string());
    // Temporaries of killed runs: ".<leaf>.deltapack-tmp-<pid>-..." whose process no longer exists.
    const std::string prefix = "." + leaf + kDirTmp;
    for (auto& entry : fs::directory_iterator(parent, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.compare(0, prefix.size(), prefix) != 0) continue;
        const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
        if (pid > 0 && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH && our_flat_dir(entry.path().string()))
            fs::remove_all(entry.path(), ec);
    }
    std::random_device rd;
    char suffix[40];
    std::snprintf(suffix, sizeof suffix, "%ld-%08x", long(::getpid()), unsigned(rd()));
    tmp_ = (parent / (prefix + suffix)).string();
    if (::mkdir(tmp_.c_str(), 0755) != 0) os_fail(errno, "cannot create " + tmp_);
}

AtomicDir::~AtomicDir() { abort(); }

void AtomicDir::commit(bool durable) {
    namespace fs = std::filesystem;
    if (tmp_.empty()) throw std::logic_error(path_ + ": committed twice or after abort");
    if (durable) {  // contents durable before the rename makes them visible
        for (auto& entry : fs::directory_iterator(tmp_)) {
            const int fd = ::open(entry.path().c_str(), O_RDONLY | O_CLOEXEC);
            if (fd >= 0) { ::fsync(fd); ::close(fd); }
        }
        fsync_dir(tmp_);
    }
    std::error_code ec;
    std::string old;
    struct stat st;
    if (::lstat(path_.c_str(), &st) == 0) {
        if (!overwrite_) already_exists(path_);
        old = tmp_ + "-old";
        if (::rename(path_.c_str(), old.c_str()) != 0) os_fail(errno, "cannot move " + path_ + " aside");
    }
    if (rename_new(tmp_, path_) != 0) {
        const int err = errno;
        if (err == EEXIST || err == ENOTEMPTY) already_exists(path_);
        os_fail(err, "cannot rename " + tmp_ + " to " + path_);
    }
    tmp_.clear();
    if (durable) fsync_dir(dir_of(path_));
    if (!old.empty() && our_flat_dir(old)) fs::remove_all(old, ec);
    else if (!old.empty()) ::unlink(old.c_str());  // a file output moved aside
}

void AtomicDir::abort() {
    if (tmp_.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(tmp_, ec);
    tmp_.clear();
}

// ---------------------------------------------------------------------------- safetensors writer

static json::Value header_entry(DType dtype, const std::vector<int64_t>& shape, uint64_t begin, uint64_t end) {
    json::Value e = json::Value::make_object();
    e.set("dtype", json::Value::make_string(safetensors_dtype_name(dtype)));
    json::Value dims = json::Value::make_array();
    for (int64_t d : shape) dims.arr.push_back(json::Value::make_int(d));
    e.set("shape", dims);
    json::Value offs = json::Value::make_array();
    offs.arr.push_back(json::Value::make_int(int64_t(begin)));
    offs.arr.push_back(json::Value::make_int(int64_t(end)));
    e.set("data_offsets", offs);
    return e;
}

// The 8-byte length and the header text, padded with spaces to a multiple of 8 (aligned data section).
static std::string header_bytes(const json::Value& header, const std::string& path) {
    std::string text = json::dump(header);
    text.append((8 - text.size() % 8) % 8, ' ');
    if (text.size() > kMaxHeader)
        throw std::invalid_argument(path + ": header of " + std::to_string(text.size()) +
                                    " bytes is over the safetensors limit of 100000000 (too many tensors or kept files?)");
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[size_t(i)] = char(uint8_t(uint64_t(text.size()) >> (8 * i)));
    return out + text;
}

static json::Value metadata_object(const std::map<std::string, std::string>& metadata) {
    json::Value meta = json::Value::make_object();
    for (auto& kv : metadata) meta.set(kv.first, json::Value::make_string(kv.second));
    return meta;
}

SafetensorsWriter::SafetensorsWriter(const std::string& path, const std::vector<TensorInfo>& tensors,
                                     const std::map<std::string, std::string>& metadata, bool durable, bool replace)
    : file_(path, replace), tensors_(tensors), pending_(tensors.size()), durable_(durable) {
    json::Value header = json::Value::make_object();
    if (!metadata.empty()) header.set("__metadata__", metadata_object(metadata));
    uint64_t off = 0;
    for (size_t i = 0; i < tensors_.size(); ++i) {
        TensorInfo& t = tensors_[i];
        if (t.name == "__metadata__" || !index_.emplace(t.name, i).second)
            throw std::invalid_argument(path + ": tensor name '" + t.name + "' is reserved or repeated");
        if (!checked_nbytes(t.shape, dtype_size(t.dtype), t.nbytes))
            throw std::invalid_argument(path + ": tensor '" + t.name + "': shape too large");
        t.offset = off;
        header.obj.emplace_back(t.name, header_entry(t.dtype, t.shape, off, off + t.nbytes));
        off += t.nbytes;
        pending_[i] = t.nbytes;
    }
    const std::string head = header_bytes(header, path);
    file_.write(head.data(), head.size());
    data_start_ = head.size();
    size_ = data_start_ + off;
}

void SafetensorsWriter::write(const std::string& name, const void* data, uint64_t nbytes) {
    if (next_ >= tensors_.size() || tensors_[next_].name != name)
        throw std::invalid_argument(file_.path() + ": tensor '" + name + "' written out of the declared order");
    if (nbytes != tensors_[next_].nbytes)
        throw std::invalid_argument(file_.path() + ": tensor '" + name + "': " + std::to_string(nbytes) +
                                    " bytes given, " + std::to_string(tensors_[next_].nbytes) + " declared");
    write_part(name, 0, data, nbytes);
    ++next_;
}

void SafetensorsWriter::write_part(const std::string& name, uint64_t first_byte, const void* data, uint64_t nbytes) {
    auto it = index_.find(name);
    if (it == index_.end()) throw std::invalid_argument(file_.path() + ": tensor '" + name + "' was not declared");
    const TensorInfo& t = tensors_[it->second];
    if (first_byte > t.nbytes || nbytes > t.nbytes - first_byte)
        throw std::invalid_argument(file_.path() + ": tensor '" + name + "': bytes [" + std::to_string(first_byte) +
                                    ", +" + std::to_string(nbytes) + ") fall outside its " + std::to_string(t.nbytes));
    file_.write_at(data_start_ + t.offset + first_byte, data, size_t(nbytes));
    // The last piece of a tensor starts its writeback, so fsync at the end finds little left to do.
    if (pending_[it->second].fetch_sub(nbytes) == nbytes && durable_) file_.start_writeback();
}

uint64_t SafetensorsWriter::finish() {
    for (size_t i = 0; i < tensors_.size(); ++i)
        if (pending_[i] != 0)
            throw std::invalid_argument(file_.path() + ": tensor '" + tensors_[i].name + "' was never written" +
                                        (pending_[i] == tensors_[i].nbytes ? "" : " whole"));
    file_.commit(durable_);
    return size_;
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, ArrayRef>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
    // Larger elements first keeps every tensor aligned to its element size.
    std::vector<const std::pair<std::string, ArrayRef>*> items;
    for (auto& t : tensors) items.push_back(&t);
    std::stable_sort(items.begin(), items.end(), [](auto* a, auto* b) {
        return dtype_size(a->second.dtype) > dtype_size(b->second.dtype);
    });
    std::vector<TensorInfo> infos;
    for (auto* it : items) infos.push_back(TensorInfo{it->first, it->second.dtype, it->second.shape, 0, 0});
    SafetensorsWriter w(path, infos, metadata);
    for (auto* it : items) w.write(it->first, it->second.data, it->second.nbytes());
    w.finish();
}

// ---------------------------------------------------------------------------- delta writer

static int size_class(size_t elem) { return elem == 8 ? 0 : elem == 4 ? 1 : elem == 2 ? 2 : 3; }

DeltaWriter::DeltaWriter(const std::string& path, bool overwrite, uint64_t in_memory)
    : path_(path), out_(new AtomicFile(path, overwrite)), memory_limit_(in_memory) {}

DeltaWriter::~DeltaWriter() { abort(); }

bool DeltaWriter::add(const EncodedRef& t, bool borrowed) {
    if (!out_) throw std::logic_error(path_ + ": tensor '" + t.name + "' added after close or abort");
    if (t.name.empty()) throw std::invalid_argument(path_ + ": a tensor has an empty name");
    if (names_.count(t.name)) throw std::invalid_argument(path_ + ": tensor '" + t.name + "' added twice");
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
    bool referenced = false;
    for (auto& c : t.components) {  // std::map: components in byte order of their names
        const size_t elem = dtype_size(c.second.dtype);
        if (elem != 8 && elem != 4 && elem != 2 && elem != 1)
            throw std::invalid_argument(path_ + ": tensor '" + t.name + "': component '" + c.first + "' has an unsupported dtype");
        const int k = size_class(elem);
        const uint64_t n = c.second.nbytes();
        if (spill_fd_[k] < 0 && in_memory_ + n <= memory_limit_) {
            if (borrowed)
                spill_mem_[k].push_back({std::string(), c.second.data, size_t(n)});
            else
                spill_mem_[k].push_back({std::string(static_cast<const char*>(c.second.data), size_t(n)), nullptr, 0});
            referenced |= borrowed;
            in_memory_ += n;
        } else {  // this size's later components follow its pieces in memory, in a scratch file
            if (spill_fd_[k] < 0) spill_fd_[k] = AtomicFile::scratch(dir_of(path_));
            write_fd(spill_fd_[k], c.second.data, size_t(n), path_);
        }
        spill_size_[k] += n;
        crc = crc32c(c.second.data, size_t(n), crc);
        comps.arr.push_back(json::Value::make_string(c.first));
        components_.push_back({t.name + ":" + c.first, c.second.dtype, c.second.shape, n});
    }
    const std::string checked = checked_entry_text(t.codec, params, t.shape, t.dtype);
    crc = crc32c(checked.data(), checked.size(), crc);  // version 2: the CRC covers the entry too
    e.set("components", comps);
    char hex[9];
    std::snprintf(hex, sizeof hex, "%08x", crc);
    e.set("crc32c", json::Value::make_string(hex));
    names_.insert(t.name);
    entries_.emplace_back(t.name, json::dump(e));
    return referenced;
}

std::string DeltaWriter::header(const std::string& extra_manifest) const {
    json::Value extra;
    try {
        extra = json::parse(extra_manifest.empty() ? "{}" : extra_manifest);
    } catch (const std::exception& ex) {
        throw std::invalid_argument(path_ + ": extra manifest is not valid JSON: " + ex.what());
    }
    if (extra.kind != json::Value::Object) throw std::invalid_argument(path_ + ": extra manifest must be a JSON object");
    json::Value man = json::Value::make_object();
    man.set("format", json::Value::make_string("deltapack"));
    man.set("version", json::Value::make_int(kFormatVersion));
    man.set("tool", json::Value::make_string("deltapack " DELTAPACK_VERSION));
    for (auto& kv : extra.obj)
        if (kv.first != "format" && kv.first != "version" && kv.first != "tool" && kv.first != "tensors")
            man.set(kv.first, kv.second);
    // The entries are already JSON text: splice them in rather than parse them back.
    std::string text = json::dump(man);
    text.pop_back();
    text += ",\"tensors\":{";
    for (size_t i = 0; i < entries_.size(); ++i) {
        if (i) text += ',';
        text += json::dump(json::Value::make_string(entries_[i].first)) + ":" + entries_[i].second;
    }
    text += "}}";
    try {  // a file the reader would refuse is never written
        check_manifest_fields(man, path_, files_.size());
    } catch (const FormatError& ex) {
        throw std::invalid_argument(std::string(ex.what()) + " (refused before writing)");
    }
    json::Value hdr = json::Value::make_object();
    hdr.set("__metadata__", metadata_object({{"deltapack", text}}));
    uint64_t off = 0;
    for (int k = 0; k < 4; ++k)  // element sizes 8, 4, 2, 1: the order of the spills
        for (const Component& c : components_)
            if (size_class(dtype_size(c.dtype)) == k) {
                hdr.obj.emplace_back(c.key, header_entry(c.dtype, c.shape, off, off + c.nbytes));
                off += c.nbytes;
            }
    if (!files_.empty())  // last: U8, after the spills
        hdr.obj.emplace_back(kFilesKey, header_entry(DType::U8, {int64_t(files_.size())}, off, off + files_.size()));
    return header_bytes(hdr, path_);
}

uint64_t DeltaWriter::add_file(const void* data, size_t n) {
    if (!out_) throw std::logic_error(path_ + ": a kept file added after close or abort");
    if (n > kMaxKeptFile || files_.size() + n > kMaxKeptTotal)
        throw std::invalid_argument(path_ + ": kept files over " + std::to_string(kMaxKeptFile >> 20) +
                                    " MiB each or " + std::to_string(kMaxKeptTotal >> 20) + " MiB in all are not stored");
    const uint64_t begin = files_.size();
    files_.append(static_cast<const char*>(data), n);
    return begin;
}

uint64_t DeltaWriter::size(const std::string& extra_manifest) const {
    uint64_t n = header(extra_manifest).size() + files_.size();
    for (uint64_t s : spill_size_) n += s;
    return n;
}

uint64_t DeltaWriter::close(const std::string& extra_manifest, bool durable) {
    if (!out_) throw std::logic_error(path_ + ": closed twice or after abort");
    try {
        const std::string head = header(extra_manifest);
        out_->write(head.data(), head.size());
        // Every 64 MiB the pages written so far start their writeback, so the final fsync waits for the last
        // ones only instead of all of them.
        uint64_t unflushed = 0;
        auto write = [&](const void* p, size_t n) {
            out_->write(p, n);
            if ((unflushed += n) >= (uint64_t(64) << 20) && durable) {
                out_->start_writeback();
                unflushed = 0;
            }
        };
        std::vector<uint8_t> buf;
        for (int k = 0; k < 4; ++k) {
            uint64_t on_disk = spill_size_[k];  // what the pieces in memory (this size's first) leave
            for (const Piece& piece : spill_mem_[k]) {
                write(piece.data(), piece.size());
                on_disk -= piece.size();
            }
            if (spill_fd_[k] < 0) continue;
            buf.resize(size_t(std::min<uint64_t>(on_disk, uint64_t(16) << 20)));  // little beside `in_memory`
            for (uint64_t done = 0; done < on_disk;) {
                const uint64_t n = std::min<uint64_t>(buf.size(), on_disk - done);
                pread_fd(spill_fd_[k], buf.data(), n, done, path_ + " (scratch)");
                write(buf.data(), size_t(n));
                done += n;
            }
        }
        out_->write(files_.data(), files_.size());
        const uint64_t size = out_->size();
        out_->commit(durable);
        abort();  // the spills
        return size;
    } catch (...) {
        abort();
        throw;
    }
}

void DeltaWriter::abort() {
    for (int& fd : spill_fd_)
        if (fd >= 0) ::close(fd), fd = -1;
    for (auto& pieces : spill_mem_) pieces.clear();
    in_memory_ = 0;
    out_.reset();
}

void save(const std::string& path, const std::vector<EncodedRef>& tensors, const std::string& extra_manifest) {
    DeltaWriter w(path);
    for (const EncodedRef& t : tensors) w.add(t);
    w.close(extra_manifest);
}

}  // namespace deltapack
