// The bank: one base in memory, fine-tunes switched on it in place (see Bank in deltapack.h).
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

void Bank::add(const std::string& name, const std::string& delta, bool force) {
    std::lock_guard<std::mutex> lock(mu_);
    if (deltas_.count(name)) throw std::invalid_argument("bank: a fine-tune named '" + name + "' is already added");
    auto c = std::make_unique<CheckpointDelta>(base_, std::shared_ptr<const DeltaFile>(DeltaFile::open(delta)), force);
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
    for (const std::string& n : base_->keys()) {  // the base in memory is the one the delta was made from
        const Buffer& b = buffers_.at(n);
        const ArrayRef& held = b.pristine.storage ? b.pristine.ref : b.live.ref;
        c->verify_base(n, held.data, held.nbytes());
    }
    // Tensors this delta changes get a pristine copy of the base, so they can be rebuilt from it.
    for (const CheckpointTensor& t : c->tensors()) {
        Buffer& b = buffers_.at(t.name);
        if (t.kind == TensorKind::Delta && !b.pristine.storage) {
            const TensorInfo& info = base_->info(t.name);
            b.pristine = Array::zeros(info.dtype, info.shape);
            base_->read(t.name, b.pristine.ref.data, info.nbytes);
        }
    }
    deltas_[name] = std::move(c);
}

std::vector<std::string> Bank::fine_tunes() const {
    std::vector<std::string> out;
    for (auto& kv : deltas_) out.push_back(kv.first);
    return out;
}

ArrayRef Bank::tensor(const std::string& name) {
    auto it = buffers_.find(name);
    if (it == buffers_.end()) throw std::out_of_range(base_->path() + ": no tensor '" + name + "' in the bank");
    return it->second.live.ref;
}

void Bank::activate(const std::vector<std::pair<std::string, float>>& deltas, int threads) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& d : deltas)
        if (!deltas_.count(d.first)) throw std::invalid_argument("bank: no fine-tune named '" + d.first + "' (add it first)");
    // What changes: tensors the new or the previous fine-tunes touch.
    auto touched = [&](const std::vector<std::pair<std::string, float>>& set) {
        std::set<std::string> out;
        for (auto& d : set)
            for (const CheckpointTensor& t : deltas_.at(d.first)->tensors())
                if (t.kind == TensorKind::Delta) out.insert(t.name);
        return out;
    };
    std::set<std::string> todo = touched(active_), now = touched(deltas);
    todo.insert(now.begin(), now.end());
    rewritten_.assign(todo.begin(), todo.end());
    ApplyParams p = apply_default_params();
    p.threads = threads;
    active_.clear();  // a failure below leaves a mix: no fine-tune is then called active
    for (const std::string& name : todo) {
        Buffer& b = buffers_.at(name);
        const ArrayRef& live = b.live.ref;
        bool first = true;
        for (auto& d : deltas) {
            const CheckpointDelta& c = *deltas_.at(d.first);
            const CheckpointTensor& t = c.tensor(name);
            if (t.kind != TensorKind::Delta) continue;
            if (first) {  // from the pristine base (its CRC checked by add), into the live buffer
                c.rebuild_from(name, b.pristine.ref.data, b.pristine.ref.nbytes(), b.pristine.ref.dtype, live.data,
                               live.nbytes(), live.dtype, d.second, threads, false);
                first = false;
            } else {  // further deltas added on top, each rounded once
                p.alpha = d.second;
                apply(c.delta().get(name), live, live, p);
            }
        }
        if (first) std::memcpy(live.data, b.pristine.ref.data, live.nbytes());  // back to the base
    }
    active_ = deltas;
}

}  // namespace deltapack
