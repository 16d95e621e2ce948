// Model weights as Hugging Face stores them: one safetensors file, or a directory of shards with an
// index (model.safetensors.index.json). See ModelFiles in deltapack.h.
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <sstream>
#include <system_error>

#include "codec.h"

namespace deltapack {

static bool is_dir_path(const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

static bool exists(const std::string& p) {
    struct stat st;
    return ::stat(p.c_str(), &st) == 0;
}

[[noreturn]] static void missing(const std::string& what) {
    throw std::system_error(ENOENT, std::generic_category(), what);
}

// A JSON file of a model directory, read from `file` (the entry `path`, links resolved): a regular file of at most
// kMaxJsonFile bytes holding strict JSON (json::parse), else an error naming `path`.
static constexpr uint64_t kMaxJsonFile = uint64_t(16) << 20;  // a config or index of a model is far smaller
static json::Value read_json_file(const std::string& file, const std::string& path) {
    struct stat st;
    if (::stat(file.c_str(), &st) != 0) throw std::system_error(errno, std::generic_category(), path + ": cannot read");
    if (!S_ISREG(st.st_mode)) throw FormatError(path + ": not a regular file");
    if (uint64_t(st.st_size) > kMaxJsonFile)
        throw FormatError(path + ": " + std::to_string(st.st_size) + " bytes is too large for a JSON file of a model (over " +
                          std::to_string(kMaxJsonFile >> 20) + " MiB)");
    std::ifstream in(file, std::ios::binary);
    if (!in) throw std::system_error(errno, std::generic_category(), path + ": cannot read");
    std::string text(size_t(st.st_size), '\0');
    in.read(&text[0], std::streamsize(text.size()));
    if (size_t(in.gcount()) != text.size()) throw FormatError(path + ": changed while being read");
    try {
        return json::parse(text);
    } catch (const std::exception& ex) {
        throw FormatError(path + ": not valid JSON (" + ex.what() + ")");
    }
}

// Whether `p` exists, without following a link at `p` itself.
static bool present(const std::string& p) {
    struct stat st;
    return ::lstat(p.c_str(), &st) == 0;
}

std::unique_ptr<ModelFiles> ModelFiles::open(const std::string& path, bool follow_links) {
    std::unique_ptr<ModelFiles> m(new ModelFiles());
    m->path_ = path;
    // A directory's files are read where resolve_in_model_dir allows (a link out of it is refused).
    auto file = [&](const std::string& name) { return resolve_in_model_dir(path, name, follow_links); };
    if (is_dir_path(path)) {
        m->is_dir_ = true;
        if (present(path + "/model.safetensors.index.json")) {
            m->read_index(path + "/model.safetensors.index.json", file("model.safetensors.index.json"));
        } else if (present(path + "/model.safetensors")) {
            m->shards_ = {"model.safetensors"};
        } else {
            missing(path + ": no model.safetensors or model.safetensors.index.json in this directory");
        }
    } else if (exists(path)) {
        m->shards_ = {path};
    } else {
        missing(path);
    }
    for (const std::string& shard : m->shards_) {
        const std::string full = m->is_dir_ ? file(shard) : shard;
        std::unique_ptr<SafetensorsFile> f;
        try {
            f = SafetensorsFile::open(full);
        } catch (const std::system_error& ex) {
            throw std::system_error(ex.code(), m->shard_path(shard) + ": cannot read shard");
        }
        for (const std::string& name : f->keys()) {
            auto it = m->shard_of_.find(name);
            if (it != m->shard_of_.end())
                throw FormatError(path + ": tensor '" + name + "' is stored twice, in " + it->second + " and " + shard);
            m->shard_of_[name] = shard;
            m->order_.push_back(name);
        }
        m->files_[shard] = std::move(f);
    }
    if (m->has_index_) {
        for (auto& kv : m->index_map_) {
            auto it = m->shard_of_.find(kv.first);
            if (it == m->shard_of_.end() || it->second != kv.second)
                throw FormatError(path + ": index lists tensor '" + kv.first + "' in " + kv.second + ", but " +
                                  (it == m->shard_of_.end() ? std::string("that shard does not hold it")
                                                            : "it is in " + it->second));
        }
        for (const std::string& name : m->order_)
            if (!m->index_map_.count(name))
                throw FormatError(path + ": tensor '" + name + "' is in " + m->shard_of_[name] + " but not in the index");
    }
    if (m->is_dir_ && present(path + "/config.json")) {
        json::Value v = read_json_file(file("config.json"), path + "/config.json");
        if (v.kind != json::Value::Object) throw FormatError(path + "/config.json: not a JSON object");
        m->config_ = json::dump(v);
    }
    return m;
}

void ModelFiles::read_index(const std::string& index, const std::string& file) {
    has_index_ = true;
    json::Value v = read_json_file(file, index);  // duplicate keys are refused by the parser
    const json::Value* wm = v.kind == json::Value::Object ? v.find("weight_map") : nullptr;
    bool ok = wm && wm->kind == json::Value::Object;
    for (size_t i = 0; ok && i < wm->obj.size(); ++i) ok = wm->obj[i].second.kind == json::Value::String;
    if (!ok) throw FormatError(index + ": no 'weight_map' object of tensor name -> shard file");
    for (auto& kv : wm->obj) {
        const std::string& shard = kv.second.str;
        if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos)
            throw FormatError(index + ": shard name '" + shard + "' is not a plain file name");
        index_map_[kv.first] = shard;
        if (std::find(shards_.begin(), shards_.end(), shard) == shards_.end()) {
            if (!present(path_ + "/" + shard)) missing(index + ": points at shard " + shard + ", which does not exist");
            shards_.push_back(shard);
        }
    }
    std::sort(shards_.begin(), shards_.end());
    if (const json::Value* meta = v.find("metadata")) index_metadata_ = json::dump(*meta);
}

std::string ModelFiles::shard_path(const std::string& shard) const { return is_dir_ ? path_ + "/" + shard : shard; }

const SafetensorsFile& ModelFiles::shard(const std::string& shard) const {
    auto it = files_.find(shard);
    if (it == files_.end()) throw std::out_of_range(path_ + ": no shard '" + shard + "'");
    return *it->second;
}

const std::string& ModelFiles::shard_of(const std::string& name) const {
    auto it = shard_of_.find(name);
    if (it == shard_of_.end()) throw std::out_of_range(path_ + ": no tensor '" + name + "'");
    return it->second;
}

const TensorInfo& ModelFiles::info(const std::string& name) const { return shard(shard_of(name)).info(name); }

void ModelFiles::read(const std::string& name, void* out, uint64_t nbytes, uint64_t first_byte) const {
    shard(shard_of(name)).read(name, out, nbytes, first_byte);
}

}  // namespace deltapack
