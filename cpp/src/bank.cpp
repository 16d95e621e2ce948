// The bank: one base in memory, fine-tunes switched on it in place or used per batch row (see Bank in
// deltapack.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

#include "codec.h"

namespace deltapack {

Bank::Bank(const std::string& base) : base_(ModelFiles::open(base)) {
    for (const std::string& name : base_->keys()) {
        const TensorInfo& t = base_->info(name);
        Buffer b;
        b.live = Array::zeros(t.dtype, t.shape);
        base_->read(name, b.live.ref.data, t.nbytes);
        buffers_.emplace(name, std::move(b));
    }
}

const CheckpointDelta& Bank::fine_tune(const std::string& name) const {
    auto it = deltas_.find(name);
    if (it == deltas_.end()) throw std::invalid_argument(where() + "no fine-tune named '" + name + "' (add it first)");
    return *it->second;
}

const ArrayRef& Bank::base_of(const std::string& tensor) const {
    auto it = buffers_.find(tensor);
    if (it == buffers_.end()) throw std::out_of_range(base_->path() + ": no tensor '" + tensor + "' in the bank");
    // Without a pristine copy no delta touches the tensor, so the live buffer is the base.
    return it->second.pristine.storage ? it->second.pristine.ref : it->second.live.ref;
}

void Bank::add(const std::string& name, const std::string& delta, bool force) {
    // Reading and checking the file needs only the (immutable) base files: switches and readers go on meanwhile.
    std::shared_ptr<const DeltaFile> file(DeltaFile::open(delta, true));
    for (const std::string& key : file->keys()) file->get(key);  // CRC-32C and structure, once
    auto c = std::make_unique<CheckpointDelta>(base_, file, force);
    std::set<std::string> seen;
    for (const CheckpointTensor& t : c->tensors()) {
        if (t.kind == TensorKind::Replaced || t.kind == TensorKind::Resized || t.source != t.name)
            throw std::invalid_argument(delta + ": tensor '" + t.name + "' is " + tensor_kind_name(t.kind) +
                                        (t.source != t.name && !t.source.empty() ? " from '" + t.source + "'" : "") +
                                        ": the bank serves fine-tunes with the base's tensors only (apply it instead)");
        if (t.dtype != base_->info(t.name).dtype)
            throw std::invalid_argument(delta + ": tensor '" + t.name + "' changes dtype; the bank keeps the base's");
        seen.insert(t.name);
    }
    for (const std::string& n : base_->keys())
        if (!seen.count(n))
            throw std::invalid_argument(delta + ": the fine-tune removed tensor '" + n + "'; the bank serves the base's tensors");
    std::unique_lock<std::shared_mutex> lock(mu_);
    if (deltas_.count(name)) throw std::invalid_argument(where() + "a fine-tune named '" + name + "' is already added");
    for (const std::string& n : base_->keys()) {  // the base in memory is the one the delta was made from
        const ArrayRef& held = base_of(n);
        c->verify_base(n, held.data, held.nbytes());
    }
    // Tensors this delta changes get a pristine copy of the base, so they can be rebuilt from it.
    for (const CheckpointTensor& t : c->tensors()) {
        Buffer& b = buffers_.at(t.name);
        if (t.kind == TensorKind::Delta && !b.pristine.storage) {
            b.pristine = Array::zeros(b.live.ref.dtype, b.live.ref.shape);
            std::memcpy(b.pristine.ref.data, b.live.ref.data, b.live.ref.nbytes());  // untouched so far: the base
        }
    }
    deltas_[name] = std::move(c);
}

void Bank::remove(const std::string& name) {
    std::unique_lock<std::shared_mutex> lock(mu_);
    fine_tune(name);
    for (auto& d : active_)
        if (d.first == name) throw std::invalid_argument(where() + "fine-tune '" + name + "' is active; activate another first");
    deltas_.erase(name);
    for (auto it = cache_.begin(); it != cache_.end();)
        if (it->key.find(name + '\x1f') == 0 || it->key.find('\x1e' + name + '\x1f') != std::string::npos) {
            cache_bytes_ -= it->bytes;
            it = cache_.erase(it);
        } else {
            ++it;
        }
    for (auto& kv : buffers_) {  // a pristine copy no remaining fine-tune needs (the live buffer is the base)
        bool needed = false;
        for (auto& d : deltas_) needed = needed || d.second->tensor(kv.first).kind == TensorKind::Delta;
        if (!needed) kv.second.pristine = Array();
    }
}

std::vector<std::string> Bank::fine_tunes() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    std::vector<std::string> out;
    for (auto& kv : deltas_) out.push_back(kv.first);
    return out;
}

Bank::Mix Bank::active() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return active_;
}

std::vector<std::string> Bank::last_rewritten() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return rewritten_;
}

ArrayRef Bank::tensor(const std::string& name) {
    auto it = buffers_.find(name);
    if (it == buffers_.end()) throw std::out_of_range(base_->path() + ": no tensor '" + name + "' in the bank");
    return it->second.live.ref;
}

bool Bank::touches(const std::string& name, const std::string& tensor) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    base_of(tensor);  // a clear error for a name the base lacks
    return fine_tune(name).tensor(tensor).kind == TensorKind::Delta;
}

void Bank::rebuild_into(const Mix& mix, const std::string& tensor, const ArrayRef& out, int threads) const {
    const ArrayRef& src = base_of(tensor);
    ApplyParams p = apply_default_params();
    p.threads = threads;
    bool first = true;
    for (auto& d : mix) {
        const CheckpointDelta& c = fine_tune(d.first);
        if (c.tensor(tensor).kind != TensorKind::Delta) continue;
        // The bank holds only delta and unchanged tensors, so this is the checkpoint's rebuild: the first delta
        // from the pristine base, the next ones on top, each rounded once. The CRC-32Cs (base and delta) were
        // checked by add().
        p.alpha = d.second;
        apply(c.delta().get(tensor, false).ref, first ? src : out, out, p);
        first = false;
    }
    if (!first || out.data == src.data) return;
    // the base: a copy, in 1 MiB pieces over the threads (a large tensor's copy is not one core's work)
    const int64_t piece = int64_t(1) << 20, n = int64_t(out.nbytes());
    parallel_rows((n + piece - 1) / piece, piece / 4, threads, [&](int64_t p0, int64_t p1) {
        const int64_t begin = p0 * piece, end = std::min(n, p1 * piece);
        std::memcpy(static_cast<uint8_t*>(out.data) + begin, static_cast<const uint8_t*>(src.data) + begin,
                    size_t(end - begin));
    });
}

void Bank::rebuild(const Mix& mix, const std::string& tensor, void* out, uint64_t nbytes, int threads) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    const ArrayRef& b = base_of(tensor);
    for (auto& d : mix) fine_tune(d.first);
    if (nbytes != b.nbytes())
        throw std::invalid_argument(where() + "tensor '" + tensor + "' needs " + std::to_string(b.nbytes()) +
                                    " bytes, not " + std::to_string(nbytes));
    rebuild_into(mix, tensor, ArrayRef{out, b.dtype, b.shape}, threads);
}

void Bank::product(const std::string& name, const std::string& tensor, const float* x, int64_t batch, float alpha,
                   float* y, int threads) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    base_of(tensor);
    const CheckpointDelta& c = fine_tune(name);
    if (c.tensor(tensor).kind == TensorKind::Delta)
        delta_product(c.delta().get(tensor, false).ref, x, batch, alpha, y, threads);
}

void Bank::delta_rows(const std::string& name, const std::string& tensor, const int64_t* rows, int64_t n, float alpha,
                      float* out) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    const ArrayRef& b = base_of(tensor);
    const CheckpointDelta& c = fine_tune(name);
    const Matrix m = Matrix::of(b.shape);
    for (int64_t i = 0; i < n; ++i)  // every index in range before anything is written
        if (rows[i] < 0 || rows[i] >= m.rows)
            throw std::out_of_range(where() + "tensor '" + tensor + "' has " + std::to_string(m.rows) + " rows; row " +
                                    std::to_string(rows[i]) + " asked");
    if (c.tensor(tensor).kind == TensorKind::Delta)
        deltapack::delta_rows(c.delta().get(tensor, false).ref, rows, n, alpha, out);
    else
        std::fill(out, out + size_t(n * m.cols), 0.0f);
}

std::unique_ptr<DeviceDelta> Bank::to_device(const std::string& name, const std::string& tensor, int device,
                                             void* stream) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    base_of(tensor);
    const CheckpointDelta& c = fine_tune(name);
    if (c.tensor(tensor).kind != TensorKind::Delta) return nullptr;
    return std::make_unique<DeviceDelta>(c.delta().get(tensor, false).ref, device, stream);
}

void Bank::mixed_product(const std::string& tensor, const std::vector<std::string>& names, const int32_t* which,
                         const float* x, int64_t batch, float alpha, float* y, int threads) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    const ArrayRef& b = base_of(tensor);
    const Matrix m = Matrix::of(b.shape);  // y's rows are the matrix's rows, x's its columns
    const int64_t cols = m.cols, rows = m.rows;
    for (const std::string& n : names) fine_tune(n);  // every name known before anything is written
    std::vector<std::vector<int64_t>> members(names.size());
    for (int64_t i = 0; i < batch; ++i) {
        if (which[i] < -1 || which[i] >= int32_t(names.size()))
            throw std::out_of_range(where() + "batch row " + std::to_string(i) + " names fine-tune " +
                                    std::to_string(which[i]) + " of " + std::to_string(names.size()));
        if (which[i] >= 0) members[size_t(which[i])].push_back(i);
    }
    // Each fine-tune's rows gathered into its own x and y; then one call runs every product on one set of threads.
    std::vector<std::vector<float>> xs(names.size()), ys(names.size());
    std::vector<ProductJob> jobs;
    for (size_t t = 0; t < names.size(); ++t) {
        const CheckpointDelta& c = fine_tune(names[t]);
        const std::vector<int64_t>& own = members[t];
        if (own.empty() || c.tensor(tensor).kind != TensorKind::Delta) continue;
        xs[t].resize(own.size() * size_t(cols));
        ys[t].assign(own.size() * size_t(rows), 0.0f);
        for (size_t i = 0; i < own.size(); ++i)
            std::memcpy(xs[t].data() + i * size_t(cols), x + size_t(own[i] * cols), size_t(cols) * sizeof(float));
        jobs.push_back(ProductJob{c.delta().get(tensor, false).ref, xs[t].data(), int64_t(own.size()), ys[t].data()});
    }
    delta_products(jobs, alpha, threads);
    for (size_t t = 0; t < names.size(); ++t) {
        if (ys[t].empty()) continue;  // no rows, or the fine-tune leaves this tensor as the base's
        for (size_t i = 0; i < members[t].size(); ++i) {
            float* out = y + size_t(members[t][i] * rows);
            const float* add = ys[t].data() + i * size_t(rows);
            for (int64_t r = 0; r < rows; ++r) out[r] = out[r] + add[r];
        }
    }
}

// A cache key: the mix's names and alphas (exact bits), "\x1f" after each name and "\x1e" between entries.
static std::string mix_key(const Bank::Mix& mix) {
    std::string key;
    for (auto& d : mix) {
        char alpha[16];
        std::snprintf(alpha, sizeof alpha, "%08x", f32_to_bits(d.second));
        key += (key.empty() ? "" : "\x1e") + d.first + '\x1f' + alpha;
    }
    return key;
}

void Bank::switch_to(const Mix& from, const Mix& mix, int threads) {
    auto touched = [&](const Mix& m) {
        std::set<std::string> out;
        for (auto& d : m)
            for (const CheckpointTensor& t : fine_tune(d.first).tensors())
                if (t.kind == TensorKind::Delta) out.insert(t.name);
        return out;
    };
    std::set<std::string> now = touched(mix), todo = touched(from);
    todo.insert(now.begin(), now.end());
    const std::string key = mix_key(mix);
    auto hit = cache_.begin();
    while (hit != cache_.end() && hit->key != key) ++hit;
    if (hit != cache_.end()) cache_.splice(cache_.begin(), cache_, hit);  // most recently used
    rewritten_.assign(todo.begin(), todo.end());
    active_.clear();  // while the buffers are a mix of states
    auto write = [&](const std::string& name, int t) {
        const ArrayRef& live = buffers_.at(name).live.ref;
        if (hit != cache_.end() && hit->tensors.count(name))
            std::memcpy(live.data, hit->tensors.at(name).ref.data, live.nbytes());
        else
            rebuild_into(mix, name, live, t);
    };
    // Large tensors one at a time on every thread; the many small ones (a thread start would cost more than
    // their rows) shared out whole among the threads.
    const int workers = threads > 0 ? threads : default_threads();
    const uint64_t large = uint64_t(16) << 20;
    std::vector<std::string> small;
    for (const std::string& name : rewritten_)
        if (buffers_.at(name).live.ref.nbytes() >= large) write(name, threads);
        else small.push_back(name);
    std::atomic<size_t> next{0};
    parallel_rows(workers, int64_t(1) << 20, workers, [&](int64_t, int64_t) {
        for (size_t i = next++; i < small.size(); i = next++) write(small[i], 1);
    });
    active_ = mix;
    if (hit != cache_.end() || cache_budget_ == 0 || mix.empty()) return;
    CacheEntry entry{key, {}, 0};
    for (const std::string& name : now) entry.bytes += buffers_.at(name).live.ref.nbytes();
    if (entry.bytes > cache_budget_) return;
    while (cache_bytes_ + entry.bytes > cache_budget_) {
        cache_bytes_ -= cache_.back().bytes;
        cache_.pop_back();
    }
    for (const std::string& name : now) {
        const ArrayRef& live = buffers_.at(name).live.ref;
        Array copy = Array::zeros(live.dtype, live.shape);
        std::memcpy(copy.ref.data, live.data, live.nbytes());
        entry.tensors.emplace(name, std::move(copy));
    }
    cache_bytes_ += entry.bytes;
    cache_.push_front(std::move(entry));
}

void Bank::activate(const Mix& mix, int threads) {
    std::unique_lock<std::shared_mutex> lock(mu_);
    for (auto& d : mix) {
        fine_tune(d.first);
        if (!std::isfinite(d.second))
            throw std::invalid_argument(where() + "alpha " + std::to_string(d.second) + " for '" + d.first + "' is not finite");
    }
    if (mix == active_) {
        rewritten_.clear();
        return;
    }
    const Mix previous = active_;
    try {
        switch_to(previous, mix, threads);
    } catch (...) {
        try {  // every tensor either state touches, back to the previous one (built before, so it builds again)
            switch_to(mix, previous, threads);
        } catch (...) {  // cannot happen short of memory; the base is a plain copy
            for (auto& kv : buffers_)
                if (kv.second.pristine.storage)
                    std::memcpy(kv.second.live.ref.data, kv.second.pristine.ref.data, kv.second.live.ref.nbytes());
            active_.clear();
        }
        throw;
    }
}

void Bank::set_cache_budget(uint64_t bytes) {
    std::unique_lock<std::shared_mutex> lock(mu_);
    cache_budget_ = bytes;
    while (cache_bytes_ > cache_budget_) {
        cache_bytes_ -= cache_.back().bytes;
        cache_.pop_back();
    }
}

uint64_t Bank::cache_bytes() const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    return cache_bytes_;
}

}  // namespace deltapack
