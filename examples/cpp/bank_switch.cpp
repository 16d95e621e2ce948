// deltapack-bank: one base model in memory and two fine-tunes of it, switched in place, then a mixed batch
// whose rows use different fine-tunes. An example of deltapack::Bank (cpp/include/deltapack/deltapack.h).
//
//   deltapack-bank BASE A.dpk B.dpk [--tensor NAME] [--threads N]
//
// BASE is a .safetensors file or a Hugging Face directory; A.dpk and B.dpk are deltas `deltapack compress`
// made against it. The bank switches A -> B -> base -> A, timing each switch and printing the CRC-32C and the
// first values of one tensor (--tensor; default: the largest matrix both fine-tunes change). Then, with the
// base in the buffers, it runs a batch of 4 rows (rows 0-1 for A, 2-3 for B) through that tensor as a linear
// layer, y = x W^T: the base's product plus Bank::product of each row's delta, against x times the rebuilt
// fine-tune's matrix (Bank::rebuild).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "deltapack/deltapack.h"

using deltapack::ArrayRef;
using deltapack::Bank;
using deltapack::DType;

static double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Element i of a float tensor's bytes as a float (f32, f16 or bf16).
static float value(const void* data, DType dtype, size_t i) {
    if (dtype == DType::F32) return static_cast<const float*>(data)[i];
    const uint16_t h = static_cast<const uint16_t*>(data)[i];
    if (dtype == DType::BF16) {  // the top half of an f32
        uint32_t bits = uint32_t(h) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;  // f16
    const float sign = (h & 0x8000) ? -1.0f : 1.0f;
    if (exponent == 0) return sign * std::ldexp(float(mantissa), -24);
    if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
    return sign * std::ldexp(float(mantissa | 0x400), exponent - 25);
}

static bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// The tensor to watch: the largest float matrix both fine-tunes change (else one of them, else the first).
static std::string pick_tensor(Bank& bank) {
    std::string best;
    int best_score = -1;
    int64_t best_size = -1;
    for (const std::string& name : bank.tensor_names()) {
        const ArrayRef t = bank.tensor(name);
        const int score = (t.shape.size() == 2 && is_float(t.dtype)) * (int(bank.touches("A", name)) + int(bank.touches("B", name)));
        if (score > best_score || (score == best_score && t.numel() > best_size)) {
            best = name;
            best_score = score;
            best_size = t.numel();
        }
    }
    return best;
}

// One line per state: the switch time, how many tensors it rewrote, and the watched tensor's contents.
static void show(Bank& bank, const char* state, double ms, const std::string& tensor) {
    const ArrayRef t = bank.tensor(tensor);
    std::printf("%-5s switch %8.3f ms, %zu tensors rewritten; %s: crc32c %08x", state, ms, bank.last_rewritten().size(),
                tensor.c_str(), deltapack::crc32c(t.data, t.nbytes()));
    if (is_float(t.dtype)) {
        std::printf(", first values");
        for (size_t i = 0; i < 4 && i < size_t(t.numel()); ++i) std::printf(" %.9g", value(t.data, t.dtype, i));
    }
    std::printf("\n");
}

// y (batch x rows) = x (batch x cols) times W transposed, W a float matrix's bytes; f64 sums.
static std::vector<double> matmul(const std::vector<float>& x, int64_t batch, const void* w, DType dtype, int64_t rows,
                                  int64_t cols) {
    std::vector<double> y(size_t(batch * rows));
    for (int64_t i = 0; i < batch; ++i)
        for (int64_t r = 0; r < rows; ++r) {
            double sum = 0;
            for (int64_t c = 0; c < cols; ++c) sum += double(x[size_t(i * cols + c)]) * value(w, dtype, size_t(r * cols + c));
            y[size_t(i * rows + r)] = sum;
        }
    return y;
}

int main(int argc, char** argv) {
    std::vector<std::string> pos;
    std::string tensor;
    int threads = 0;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--tensor" && i + 1 < argc) tensor = argv[++i];
        else if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
        else pos.push_back(a);
    }
    if (pos.size() != 3 || pos[0].compare(0, 1, "-") == 0) {
        std::fprintf(stderr, "usage: deltapack-bank BASE A.dpk B.dpk [--tensor NAME] [--threads N]\n");
        return 2;
    }
    try {
        auto t0 = std::chrono::steady_clock::now();
        Bank bank(pos[0]);  // every base tensor read once
        std::printf("base %s: %zu tensors, read in %.1f ms\n", pos[0].c_str(), bank.tensor_names().size(), ms_since(t0));
        t0 = std::chrono::steady_clock::now();
        bank.add("A", pos[1]);  // checks that the delta was made against this base
        bank.add("B", pos[2]);
        std::printf("fine-tunes A = %s, B = %s: added in %.1f ms\n", pos[1].c_str(), pos[2].c_str(), ms_since(t0));
        if (tensor.empty()) tensor = pick_tensor(bank);
        const ArrayRef w = bank.tensor(tensor);  // the live buffer: its address never changes

        // Switches: each rebuilds, from the base, the tensors the new or the previous fine-tune changes.
        const std::pair<const char*, Bank::Mix> states[] = {
            {"A", {{"A", 1.0f}}}, {"B", {{"B", 1.0f}}}, {"base", {}}, {"A", {{"A", 1.0f}}}};
        for (const auto& state : states) {
            t0 = std::chrono::steady_clock::now();
            bank.activate(state.second, threads);
            show(bank, state.first, ms_since(t0), tensor);
        }

        // A mixed batch through `tensor` as a linear layer, the buffers back at the base.
        if (w.shape.size() != 2 || !is_float(w.dtype)) {
            std::printf("%s is not a float matrix: no mixed batch\n", tensor.c_str());
            return 0;
        }
        bank.activate({}, threads);
        const int64_t rows = w.shape[0], cols = w.shape[1], batch = 4;
        std::mt19937 rng(7);
        std::normal_distribution<float> normal;
        std::vector<float> x(size_t(batch * cols));
        for (float& v : x) v = normal(rng);
        const char* row_of[batch] = {"A", "A", "B", "B"};

        t0 = std::chrono::steady_clock::now();
        std::vector<float> delta(size_t(batch * rows), 0.0f);  // the fine-tunes' part, rows 0-1 A, rows 2-3 B
        bank.product("A", tensor, x.data(), 2, 1.0f, delta.data(), threads);
        bank.product("B", tensor, x.data() + 2 * cols, 2, 1.0f, delta.data() + 2 * rows, threads);
        const double product_ms = ms_since(t0);
        std::vector<double> y = matmul(x, batch, w.data, w.dtype, rows, cols);  // the base's part
        for (size_t i = 0; i < y.size(); ++i) y[i] += delta[i];

        t0 = std::chrono::steady_clock::now();
        std::vector<uint8_t> rebuilt_a(w.nbytes()), rebuilt_b(w.nbytes());  // the fine-tunes' matrices, rebuilt
        bank.rebuild({{"A", 1.0f}}, tensor, rebuilt_a.data(), rebuilt_a.size(), threads);
        bank.rebuild({{"B", 1.0f}}, tensor, rebuilt_b.data(), rebuilt_b.size(), threads);
        const double rebuild_ms = ms_since(t0);
        double diff = 0, largest = 0, largest_delta = 0;
        for (int64_t i = 0; i < batch; ++i) {
            const std::vector<uint8_t>& ft = std::strcmp(row_of[i], "A") == 0 ? rebuilt_a : rebuilt_b;
            const std::vector<float> xi(x.begin() + i * cols, x.begin() + (i + 1) * cols);
            const std::vector<double> want = matmul(xi, 1, ft.data(), w.dtype, rows, cols);
            for (int64_t r = 0; r < rows; ++r) {
                diff = std::fmax(diff, std::fabs(y[size_t(i * rows + r)] - want[size_t(r)]));
                largest = std::fmax(largest, std::fabs(want[size_t(r)]));
                largest_delta = std::fmax(largest_delta, std::fabs(double(delta[size_t(i * rows + r)])));
            }
        }
        std::printf("mixed batch through %s [%lld, %lld], rows 0-1 A, 2-3 B: product %.3f ms, rebuild %.3f ms; "
                    "max |delta part| %.6g, max |product - rebuild| %.6g (relative %.3g)\n",
                    tensor.c_str(), (long long)rows, (long long)cols, product_ms, rebuild_ms, largest_delta, diff,
                    largest > 0 ? diff / largest : 0.0);
    } catch (const std::exception& ex) {
        std::fprintf(stderr, "deltapack-bank: %s\n", ex.what());
        return 1;
    }
    return 0;
}
