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

// A JSON file of a model directory: strict JSON (json::parse), else FormatError naming the file.
static json::Value read_json_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::system_error(errno, std::generic_category(), path + ": cannot read");
    std::ostringstream text;
    text << in.rdbuf();
    try {
        return json::parse(text.str());
    } catch (const std::exception& ex) {
        throw FormatError(path + ": not valid JSON (" + ex.what() + ")");
    }
}

std::unique_ptr<ModelFiles> ModelFiles::open(const std::string& path) {
    std::unique_ptr<ModelFiles> m(new ModelFiles());
    m->path_ = path;
    if (is_dir_path(path)) {
        m->is_dir_ = true;
        const std::string index = path + "/model.safetensors.index.json";
        if (exists(index)) {
            m->read_index(index);
        } else if (exists(path + "/model.safetensors")) {
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
        const std::string full = m->shard_path(shard);
        std::unique_ptr<SafetensorsFile> f;
        try {
            f = SafetensorsFile::read_header(full);
        } catch (const std::system_error& ex) {
            throw std::system_error(ex.code(), full + ": cannot read shard");
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
    const std::string config = path + "/config.json";
    if (m->is_dir_ && exists(config)) {
        json::Value v = read_json_file(config);
        if (v.kind != json::Value::Object) throw FormatError(config + ": not a JSON object");
        m->config_ = json::dump(v);
    }
    return m;
}

void ModelFiles::read_index(const std::string& index) {
    has_index_ = true;
    json::Value v = read_json_file(index);  // duplicate keys are refused by the parser
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
            if (!exists(path_ + "/" + shard)) missing(index + ": points at shard " + shard + ", which does not exist");
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
