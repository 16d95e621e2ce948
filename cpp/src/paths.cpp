// What deltapack reads from a model directory and where it may write (docs/SECURITY.md, "Files and
// directories"). Every command goes through these rules: compress, apply, the exporters, deltapack-apply
// and the C API.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "codec.h"

namespace deltapack {

namespace fs = std::filesystem;

static bool ends_with_nocase(const std::string& s, const char* suffix) {
    const size_t n = std::strlen(suffix);
    if (s.size() < n) return false;
    for (size_t i = 0; i < n; ++i)
        if (std::tolower(static_cast<unsigned char>(s[s.size() - n + i])) != static_cast<unsigned char>(suffix[i]))
            return false;
    return true;
}

bool is_weight_file(const std::string& name) {
    // Tensors in any container (some are pickles: loading one runs code), and the indexes that point at them.
    static const char* suffixes[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                                     ".onnx", ".pkl", ".pickle", ".npy", ".npz", ".joblib", ".index.json"};
    for (const char* s : suffixes)
        if (ends_with_nocase(name, s)) return true;
    return false;
}

std::string kept_file_problem(const std::string& name) {
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
        return "is not a plain file name";
    if (name.size() > kMaxFileName) return "is longer than " + std::to_string(kMaxFileName) + " bytes";
    for (unsigned char c : name)
        if (c < 0x20 || c == 0x7f) return "holds a control character";
    if (!json::is_utf8(name)) return "is not UTF-8";
    if (name[0] == '.') return "is a hidden file";
    if (is_weight_file(name)) return "is a weight or index file (apply writes those itself)";
    return "";
}

// The real path of `p` (every link resolved); "" when it does not exist.
static std::string real_path(const std::string& p) {
    char* r = ::realpath(p.c_str(), nullptr);
    if (!r) return "";
    std::string out(r);
    std::free(r);
    return out;
}

static bool is_under(const fs::path& p, const fs::path& dir) {
    auto d = dir.begin(), q = p.begin();
    for (; d != dir.end(); ++d, ++q)
        if (q == p.end() || *q != *d) return false;
    return q != p.end();
}

std::string resolve_in_model_dir(const std::string& dir, const std::string& name, bool follow_links) {
    const std::string path = dir + "/" + name;
    const std::string target = real_path(path);  // every link on the way resolved (in `name`'s folders too)
    if (target.empty()) return path;               // missing: the caller's open says so
    const fs::path real_dir = real_path(dir), t = target;
    if (follow_links || is_under(t, real_dir)) return target;
    // A Hugging Face cache: models--org--name/snapshots/<revision>/<file> -> ../../blobs/<hash>.
    if (real_dir.parent_path().filename() == "snapshots" && t.parent_path() == real_dir.parent_path().parent_path() / "blobs")
        return target;
    throw FormatError(path + ": a symbolic link to " + target +
                      ", outside the model directory: not followed (--follow-links / follow_links=True to read it)");
}

std::vector<KeptFile> read_kept_files(const std::string& dir, bool follow_links, std::vector<KeptFile>* skipped) {
    std::vector<KeptFile> files;
    std::error_code ec;
    std::vector<std::string> names;
    for (auto& entry : fs::directory_iterator(dir, ec)) names.push_back(entry.path().filename().string());
    if (ec) throw std::system_error(ec, dir + ": cannot list");
    std::sort(names.begin(), names.end());
    uint64_t total = 0;
    for (const std::string& name : names) {
        if (!kept_file_problem(name).empty()) continue;  // weights, hidden files, odd names: never kept
        const std::string path = resolve_in_model_dir(dir, name, follow_links);
        struct stat st;
        if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;  // directories, devices, dangling links
        std::string why;
        if (uint64_t(st.st_size) > kMaxKeptFile)
            why = std::to_string(st.st_size) + " bytes, over the limit of " + std::to_string(kMaxKeptFile >> 20) + " MiB";
        else if (files.size() == kMaxKeptFiles)
            why = "the directory has more than " + std::to_string(kMaxKeptFiles) + " files to keep";
        else if (total + uint64_t(st.st_size) > kMaxKeptTotal)
            why = "the kept files would pass " + std::to_string(kMaxKeptTotal >> 20) + " MiB in all";
        if (!why.empty()) {
            if (skipped) skipped->push_back({name, why});
            continue;
        }
        total += uint64_t(st.st_size);
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw std::system_error(errno, std::generic_category(), dir + "/" + name + ": cannot read");
        std::string data;
        char buf[1 << 16];
        for (;;) {
            const ssize_t got = ::read(fd, buf, sizeof buf);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0) {
                const int err = errno;
                ::close(fd);
                throw std::system_error(err, std::generic_category(), dir + "/" + name + ": cannot read");
            }
            if (got == 0) break;
            if (data.size() + size_t(got) > kMaxKeptFile) {  // it grew while being read
                ::close(fd);
                throw FormatError(dir + "/" + name + ": grew past " + std::to_string(kMaxKeptFile >> 20) +
                                  " MiB while being read");
            }
            data.append(buf, size_t(got));
        }
        ::close(fd);
        files.push_back({name, std::move(data)});
    }
    return files;
}

// ---------------------------------------------------------------------------- outputs

const char* output_kind_name(OutputKind k) {
    switch (k) {
        case OutputKind::DeltaFile: return "a deltapack file";
        case OutputKind::SafetensorsFile: return "a safetensors file";
        case OutputKind::GgufFile: return "a GGUF file";
        case OutputKind::ModelDirectory: return "a model directory";
        case OutputKind::AdapterDirectory: return "a PEFT adapter directory";
    }
    return "?";
}

// Files an earlier `deltapack apply` may have written into a model directory besides the names of this run: shards,
// their index, and the config, tokenizer and template files of Hugging Face model directories. Nothing else (a
// thesis.txt beside one shard) is taken for an output.
static bool model_directory_file(const std::string& name) {
    static const char* known[] = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                  "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
                                  "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
                                  "preprocessor_config.json", "model.safetensors.index.json"};
    for (const char* k : known)
        if (name == k) return true;
    return ends_with_nocase(name, ".safetensors");
}

// Why the existing `path` is not an earlier output of `kind` (so --overwrite must not replace it), or "".
static std::string not_an_output(const std::string& path, OutputKind kind, const struct stat& st,
                                 const std::vector<std::string>& writes) {
    const bool dir = kind == OutputKind::ModelDirectory || kind == OutputKind::AdapterDirectory;
    if (dir != S_ISDIR(st.st_mode) || (!dir && !S_ISREG(st.st_mode)))
        return dir ? "it is not a directory" : "it is not a regular file";
    if (!dir) {
        if (kind == OutputKind::GgufFile) {
            char magic[4] = {};
            const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
            const bool ok = fd >= 0 && ::pread(fd, magic, 4, 0) == 4 && std::memcmp(magic, "GGUF", 4) == 0;
            if (fd >= 0) ::close(fd);
            return ok ? "" : "it is not a GGUF file";
        }
        try {
            auto f = SafetensorsFile::open(path);
            if (kind == OutputKind::DeltaFile && !f->metadata().count("deltapack")) return "it is not a deltapack file";
        } catch (const std::exception&) {
            return kind == OutputKind::DeltaFile ? "it is not a deltapack file" : "it is not a safetensors file";
        }
        return "";
    }
    std::error_code ec;
    bool weights = false;
    for (auto& entry : fs::directory_iterator(path, ec)) {
        const std::string name = entry.path().filename().string();
        struct stat es;
        if (::lstat(entry.path().c_str(), &es) != 0 || !S_ISREG(es.st_mode))
            return "it holds '" + name + "', which is not a regular file";
        const bool written = std::find(writes.begin(), writes.end(), name) != writes.end();
        if (kind == OutputKind::AdapterDirectory) {
            if (!written && name != "adapter_config.json" && name != "adapter_model.safetensors")
                return "it holds '" + name + "', which export peft does not write";
            weights |= name == "adapter_config.json";
        } else {
            if (!written && (name[0] == '.' || !model_directory_file(name)))
                return "it holds '" + name + "', which deltapack apply does not write";
            weights |= ends_with_nocase(name, ".safetensors");
        }
    }
    if (ec) return "it cannot be listed (" + ec.message() + ")";
    if (fs::is_empty(path, ec)) return "";  // nothing to lose
    if (!weights)
        return kind == OutputKind::AdapterDirectory ? "it holds no adapter_config.json" : "it holds no .safetensors weights";
    return "";
}

std::string output_path(const std::string& out) {
    if (out.empty()) throw std::invalid_argument("the output path is empty");
    fs::path abs = fs::absolute(out);
    while (!abs.has_filename() && abs != abs.root_path()) abs = abs.parent_path();  // "dir/" names dir
    const std::string leaf = abs.filename().string();
    if (leaf.empty() || leaf == "." || leaf == "..")
        throw std::invalid_argument(out + ": not a name to write an output under");
    // The folder as the kernel will resolve it: links first, then "..", so LINK/../NAME is where LINK's target's
    // parent is, not NAME beside LINK (lexical normalisation first would check another place than is written).
    std::error_code ec;
    const fs::path parent = fs::weakly_canonical(abs.parent_path(), ec);
    if (ec) throw std::system_error(ec, out + ": cannot resolve its folder");
    return (parent / leaf).string();
}

void check_output(const std::string& out, OutputKind kind, const std::vector<std::string>& inputs, bool overwrite,
                  const std::vector<std::string>& writes) {
    const fs::path target = output_path(out);  // a link at `out` itself is not followed
    struct stat st;
    const bool exists = ::lstat(target.c_str(), &st) == 0;
    for (const std::string& in : inputs) {
        if (in.empty()) continue;
        const std::string real_in = real_path(in);
        if (real_in.empty()) continue;  // opening it reports that
        const fs::path r = real_in;
        if (r == target || is_under(target, r))
            throw std::invalid_argument(out + ": " + (r == target ? "is the input " : "lies inside the input ") + in +
                                        "; write the output somewhere else");
        if (is_under(r, target))
            throw std::invalid_argument(out + ": holds the input " + in + ", which replacing it would delete; write the "
                                        "output somewhere else");
        struct stat is;
        if (exists && ::stat(in.c_str(), &is) == 0 && is.st_dev == st.st_dev && is.st_ino == st.st_ino)
            throw std::invalid_argument(out + ": is the input " + in + " (a hard link to it); write the output somewhere else");
    }
    if (!exists) return;
    if (S_ISLNK(st.st_mode))
        throw std::system_error(EEXIST, std::generic_category(),
                                out + " is a symbolic link: deltapack does not write through links (remove it or choose another name)");
    if (!overwrite)
        throw std::system_error(EEXIST, std::generic_category(), out + " already exists (use --overwrite to replace it)");
    const std::string why = not_an_output(target.string(), kind, st, writes);
    if (!why.empty())
        throw std::system_error(EEXIST, std::generic_category(),
                                out + " exists and " + why + ": --overwrite replaces only " + output_kind_name(kind) +
                                    " this command could have written; move it away or choose another name");
}

}  // namespace deltapack
