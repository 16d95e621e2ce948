// The one registry of codecs. Adding a codec: write cpp/src/codecs/<name>.cpp, add a line here,
// its reference in python/deltapack/reference.py, and its section in docs/FORMAT.md.
#include "codec.h"

namespace deltapack {

const Codec& sign_codec();
const Codec& levels_codec();
const Codec& sparse_codec();
const Codec& lowrank_codec();
const Codec& quant_codec();
const Codec& dense_codec();

const std::vector<const Codec*>& all_codecs() {
    static const std::vector<const Codec*> codecs = {&sign_codec(),    &levels_codec(), &sparse_codec(),
                                                     &lowrank_codec(), &quant_codec(),  &dense_codec()};
    return codecs;
}

const Codec& find_codec(const std::string& name) {
    for (const Codec* c : all_codecs())
        if (name == c->name()) return *c;
    std::string known;
    for (const Codec* c : all_codecs()) known += (known.empty() ? "" : ", ") + std::string(c->name());
    throw std::invalid_argument("unknown codec '" + name + "' (known: " + known + ")");
}

}  // namespace deltapack
