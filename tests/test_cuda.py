"""The CUDA path (issue 22, docs/cuda.md). Everywhere: the kernels' bodies run by the host emulation (device
"emulate": the same plans, grids and arithmetic as on a GPU) against the CPU engine, bit for bit, on every codec,
dtype and rounding, odd shapes and tails included; the batch products against delta_products; the GPU bank's code
path against the CPU bank. With a GPU (skipped, with the reason, where none is visible): the device against the
CPU engine, bit for bit. The build itself (nvcc, sm_80/sm_90, warnings as errors) is tests/test_cuda_build.py."""
import numpy as np
import pytest
from conftest import bits, make_delta
from test_exact import CONFIGS, id_of
from test_mixed_batches import f32_models  # noqa: F401  (the fixture)

import deltapack as dp
from deltapack import _core

torch = pytest.importorskip("torch")

EMULATE = dp.cuda.EMULATE
SHAPES = [(37, 301), (9, 16), (45,), (2, 3, 17), (1, 1), (4, 0)]
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
GPU = dp.cuda.device_count() > 0 and torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not GPU, reason="no CUDA device visible (bench/gpu_check.sh runs these on a GPU)")


def _encoded(codec, params, shape, seed=3):
    if codec == "lowrank" and (len(shape) == 1 or min(shape) < 5):
        pytest.skip("rank above the matrix's")
    return dp.encode(make_delta(shape, "f16", seed=seed), codec, **params)


def _base(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(TORCH[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("codec,params", CONFIGS, ids=[id_of(c) for c in CONFIGS])
def test_emulated_kernels_rebuild_the_cpu_engines_bits(codec, params, shape):
    enc = _encoded(codec, params, shape)
    for base_dtype in TORCH:
        base = _base(shape, base_dtype)
        for out_dtype in TORCH:
            out = torch.empty(shape, dtype=TORCH[out_dtype])
            for rounding in dp.tensors.ROUNDINGS:
                for alpha in (1.0, -0.7):
                    want = dp.apply(base, enc, alpha=alpha, out=out.clone(), rounding=rounding)
                    got = dp.cuda.apply(base, enc, alpha=alpha, out=out.clone(), rounding=rounding, device=EMULATE)
                    assert np.array_equal(bits(got), bits(want)), (base_dtype, out_dtype, rounding, alpha)
        in_place = base.clone()
        dp.cuda.apply(in_place, enc, alpha=0.5, out=in_place, device=EMULATE)
        assert np.array_equal(bits(in_place), bits(dp.apply(base, enc, alpha=0.5))), base_dtype
    assert np.array_equal(bits(dp.decode(enc, device=EMULATE)), bits(dp.decode(enc)))


@pytest.mark.parametrize("codec,params", CONFIGS, ids=[id_of(c) for c in CONFIGS])
def test_emulated_kernels_in_16_byte_pieces_and_element_by_element(codec, params):
    """Rows of whole 8-column runs on 16-byte aligned memory move in 16-byte loads and stores; other memory element
    by element. Both give the CPU's bits (here the same tensors at an aligned and at a shifted address)."""
    enc = _encoded(codec, params, (6, 64))
    for dtype in TORCH:
        storage = torch.zeros(6 * 64 + 1, dtype=TORCH[dtype])
        for offset in (0, 1):  # torch allocations are 64-byte aligned: offset 1 is not 16-byte aligned
            base = storage[offset:offset + 6 * 64].view(6, 64)
            base.copy_(_base((6, 64), dtype))
            out = torch.empty(6 * 64 + 1, dtype=TORCH[dtype])[offset:offset + 6 * 64].view(6, 64)
            got = dp.cuda.apply(base, enc, alpha=0.5, out=out, device=EMULATE)
            assert np.array_equal(bits(got), bits(dp.apply(base.clone(), enc, alpha=0.5))), (dtype, offset)
    decoded = torch.empty(6 * 64 + 1)[1:].view(6, 64)
    _core.DeviceDelta(enc._core(), -1).decode(decoded)
    assert np.array_equal(bits(decoded), bits(dp.decode(enc)))


@pytest.mark.parametrize("shape", [(37, 301), (9, 16), (45,), (70, 13)], ids=str)
@pytest.mark.parametrize("codec,params", CONFIGS, ids=[id_of(c) for c in CONFIGS])
def test_emulated_products_are_delta_products(codec, params, shape):
    """The CUDA batch products have delta_products' bits (its summation orders: sign tables and spans, lowrank
    u (v x), 16-lane dots of decoded rows), for decode batches of 1 to 64 rows."""
    enc = _encoded(codec, params, shape)
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    rng = np.random.default_rng(2)
    for batch in (0, 1, 3, 4, 16, 64):
        x = rng.standard_normal((batch, cols)).astype(np.float32)
        x[:1, ::5] = -0.0
        start = rng.standard_normal((batch, rows)).astype(np.float32)
        want = dp.delta_product(enc, x, alpha=0.75, out=start.copy())
        got = dp.cuda.delta_product(enc, torch.from_numpy(x), alpha=0.75, out=torch.from_numpy(start.copy()),
                                    device=EMULATE)
        assert np.array_equal(bits(got), bits(want)), batch


def test_emulated_mixed_batch_of_17_fine_tunes():
    """Every codec in one mixed batch, more fine-tunes than one launch takes (16): each job's rows get the bits of
    its own delta_product."""
    shape = (40, 64)
    encs = [dp.encode(make_delta(shape, seed=s), c, **p) for s, (c, p) in enumerate(CONFIGS[:17])]
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1 + i % 4, 64)).astype(np.float32) for i in range(len(encs))]
    starts = [rng.standard_normal((x.shape[0], 40)).astype(np.float32) for x in xs]
    got = dp.cuda.products([(e, torch.from_numpy(x), torch.from_numpy(s.copy())) for e, x, s in zip(encs, xs, starts)],
                           alpha=-1.5, device=EMULATE)
    for e, x, s, g in zip(encs, xs, starts, got):
        assert np.array_equal(bits(g), bits(dp.delta_product(e, x, alpha=-1.5, out=s.copy()))), e.codec


def test_emulated_errors_are_the_cpu_engines():
    # a damaged scale: |alpha x delta| beyond 2^126 in row 3
    enc = dp.encode(make_delta((6, 40)), "sign", scope="row")
    enc.components["scales"] = enc.components["scales"].copy()
    enc.components["scales"][3] = 3e38
    base = _base((6, 40), "f32")
    with pytest.raises(dp.FormatError, match="at row 3: not a finite value"):
        dp.apply(base, enc, alpha=2.0)
    with pytest.raises(dp.FormatError, match="'<tensor>': alpha x delta is beyond 2.126 or not a number at row 3"):
        dp.cuda.apply(base, enc, alpha=2.0, device=EMULATE)
    # an f16 rebuild that overflows in row 2 (a finite base)
    enc = dp.encode(np.full((4, 8), 1000.0, np.float32), "dense")
    base = torch.zeros(4, 8, dtype=torch.float16)
    base[2, 5] = 65000
    for run in (dp.apply, lambda b, e, **k: dp.cuda.apply(b, e, device=EMULATE, **k)):
        with pytest.raises(dp.FormatError, match="overflows float16 at row 2"):
            run(base, enc)
        with pytest.raises(dp.FormatError, match="overflows float16 at row 2"):  # in place: the base is read first
            b = base.clone()
            run(b, enc, out=b)
    enc = dp.encode(make_delta((5, 8)), "sign")
    with pytest.raises(ValueError, match="alpha nan is invalid"):
        dp.cuda.apply(_base((5, 8), "f32"), enc, alpha=float("nan"), device=EMULATE)
    with pytest.raises(ValueError, match="in-place apply needs out and base of the same dtype"):
        b = _base((5, 8), "f32")
        dp.cuda.apply(b, enc, out=b.view(-1).view(torch.float16)[:40].view(5, 8), device=EMULATE)  # b's memory
    with pytest.raises(ValueError, match="does not have the delta's shape"):
        dp.cuda.apply(_base((5, 8), "f32"), enc, out=torch.empty(8, 5), device=EMULATE)
    with pytest.raises(ValueError, match="dtype i32 is not supported"):
        dp.cuda.apply(torch.zeros(5, 8, dtype=torch.int32), enc, device=EMULATE)
    pair = torch.zeros(2 * 40, dtype=torch.float32)
    with pytest.raises(ValueError, match="out partially overlaps base"):
        _core.DeviceDelta(enc._core(), -1).apply(pair[:40].view(5, 8), pair[8:48].view(5, 8), 1.0)
    with pytest.raises(ValueError, match="CUDA path takes a CUDA device"):
        dp.cuda.decode(enc, "cpu")
    other = dp.encode(make_delta((8, 5)), "sign")
    with pytest.raises(ValueError, match="a 8 x 5 delta among 5 x 8 ones"):
        dp.cuda.products([(enc, torch.zeros(1, 8), None), (other, torch.zeros(1, 5), None)], device=EMULATE)
    assert _core.device_products_workspace([(_core.DeviceDelta(enc._core(), -1), torch.zeros(2, 8),
                                             torch.zeros(2, 5))]) == 0  # sign: no workspace
    dd = _core.DeviceDelta(dp.encode(make_delta((5, 8)), "lowrank", rank=2)._core(), -1)
    x, y = torch.zeros(2, 8), torch.zeros(2, 5)
    need = _core.device_products_workspace([(dd, x, y)])
    assert need >= 2 * 2 * 17 * 4  # v x in 16 lanes and folded, rank 2 x batch 2 (each job 256-byte aligned)
    with pytest.raises(ValueError, match=f"the workspace holds {need - 1} bytes; the batch needs {need}"):
        _core.device_products([(dd, x, y)], 1.0, torch.empty(need - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs f32 x of batch x 8 and f32 y of batch x 5"):
        _core.device_products([(dd, x, torch.zeros(2, 4))], 1.0, torch.empty(need, dtype=torch.uint8))


def test_a_damaged_delta_is_refused_before_anything_is_copied():
    enc = dp.encode(make_delta((6, 40)), "sign", scope="row")
    enc.components["scales"] = enc.components["scales"][:5]
    with pytest.raises(dp.FormatError, match="scales"):
        _core.DeviceDelta(enc._core(), -1)


def test_components_sharing_an_address_are_copied_whole():
    """Empty components may start where another one does (here views of rowptr's memory): the copy to the device
    takes the whole component there, not an empty one, or the kernels would read past what was copied."""
    rowptr = np.zeros(41, np.int64)
    enc = dp.Encoded("sparse", {"p": 0.9, "mode": "random", "seed": 0, "values": "f16", "index": "gaps"}, (40, 200),
                     "f32", {"rowptr": rowptr, "values": rowptr.view(np.float16)[:0], "gaps": rowptr.view(np.uint8)[:0]})
    base = _base((40, 200), "f32")
    want = dp.apply(base, enc, alpha=2.0)
    assert np.array_equal(bits(dp.cuda.apply(base, enc, alpha=2.0, device=EMULATE)), bits(want))


@pytest.mark.skipif(GPU, reason="checks the refusals of a machine without a GPU")
def test_without_a_gpu_device_calls_say_why():
    enc = dp.encode(make_delta((5, 8)), "sign")
    want = "not visible \\(0 devices\\)" if dp.cuda.built() else "built without CUDA"
    with pytest.raises((ValueError, RuntimeError), match=want):
        _core.DeviceDelta(enc._core(), 0)
    assert dp.cuda.device_count() == 0


# ------------------------------------------------------------------------------ the bank's GPU path


@pytest.fixture(scope="module")
def banks(f32_models):
    cpu, emulated = dp.Bank(f32_models / "base"), dp.Bank(f32_models / "base", device=EMULATE)
    for bank in (cpu, emulated):
        for name in "abc":
            bank.add(name, f32_models / f"{name}.dpk")
    return cpu, emulated


def test_emulated_bank_activates_the_cpu_banks_bits(banks):
    cpu, emulated = banks
    for mix in ("a", {"a": 1.0, "c": 0.5}, "b", None, {"c": -1.0}):
        want, got = cpu.activate(mix), emulated.activate(mix)
        for name in want:
            assert np.array_equal(bits(got[name]), bits(want[name])), (mix, name)
        assert emulated.active == cpu.active and sorted(emulated.last_rewritten) == sorted(cpu.last_rewritten)
        rebuilt = emulated.rebuild({"b": 0.5}, "model.layers.0.mlp.up_proj.weight")
        assert np.array_equal(bits(rebuilt), bits(cpu.rebuild({"b": 0.5}, "model.layers.0.mlp.up_proj.weight")))
    with pytest.raises(ValueError, match="no fine-tune named 'zzz'"):
        emulated.activate("zzz")
    with pytest.raises(ValueError, match="use state_dict"):
        emulated.numpy("model.norm.weight")
    with emulated.reading():
        with pytest.raises(RuntimeError, match="would wait for itself"):
            emulated.activate("a")
    emulated.activate("a")
    with pytest.raises(ValueError, match="fine-tune 'a' is active"):
        emulated.remove("a")
    emulated.activate(None)
    cpu.activate(None)
    with pytest.raises(ValueError, match="cache_bytes is for a CPU bank"):
        dp.Bank("no-such-base", cache_bytes=1, device=EMULATE)


def test_emulated_bank_patch_runs_mixed_batches_with_the_cpu_banks_bits(banks):
    """A patched model's mixed batch through the CUDA batch-product kernels (emulated) gives exactly the logits of
    the CPU bank's delta_products, and greedy generation the same tokens."""
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_llama_config
    from test_mixed_batches import ROWS

    cpu, emulated = banks
    models = [b.patch(transformers.LlamaForCausalLM(tiny_llama_config(tie=True)).eval()) for b in banks]
    ids = torch.randint(0, 96, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with cpu.rows(ROWS):
            want, want_tokens = models[0](ids).logits, models[0].generate(ids, **kw)
        with emulated.rows(ROWS):
            got, got_tokens = models[1](ids).logits, models[1].generate(ids, **kw)
    assert torch.equal(got, want)
    assert torch.equal(got_tokens, want_tokens)


# ------------------------------------------------------------------------------ on a GPU


@NEEDS_GPU
@pytest.mark.parametrize("codec,params", CONFIGS, ids=[id_of(c) for c in CONFIGS])
def test_gpu_kernels_rebuild_the_cpu_engines_bits(codec, params):
    for shape in SHAPES:
        if codec == "lowrank" and (len(shape) == 1 or min(shape) < 5):
            continue
        enc = dp.encode(make_delta(shape, "f16", seed=3), codec, **params)
        for base_dtype in TORCH:
            base = _base(shape, base_dtype)
            for out_dtype in TORCH:
                for rounding in dp.tensors.ROUNDINGS:
                    want = dp.apply(base, enc, alpha=-0.7, out=torch.empty(shape, dtype=TORCH[out_dtype]),
                                    rounding=rounding)
                    got = dp.apply(base.cuda(), enc, alpha=-0.7,
                                   out=torch.empty(shape, dtype=TORCH[out_dtype], device="cuda"), rounding=rounding)
                    assert np.array_equal(bits(got.cpu()), bits(want)), (shape, base_dtype, out_dtype, rounding)
        assert np.array_equal(bits(dp.decode(enc, device="cuda").cpu()), bits(dp.decode(enc)))
        if len(shape) == 2 and shape[1]:
            x = np.random.default_rng(0).standard_normal((16, shape[1])).astype(np.float32)
            want = dp.delta_product(enc, x, alpha=0.75)
            got = dp.delta_product(enc, torch.from_numpy(x).cuda(), alpha=0.75)
            assert np.array_equal(bits(got.cpu()), bits(want)), shape


@NEEDS_GPU
def test_gpu_bank_patch_matches_the_cpu_bank(f32_models):
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_llama_config
    from test_mixed_batches import ROWS

    cpu, gpu = dp.Bank(f32_models / "base"), dp.Bank(f32_models / "base", device="cuda")
    for bank in (cpu, gpu):
        for name in "abc":
            bank.add(name, f32_models / f"{name}.dpk")
    for mix in ("a", {"a": 1.0, "c": 0.5}, None):
        want, got = cpu.activate(mix), gpu.activate(mix)
        assert all(np.array_equal(bits(got[n].cpu()), bits(want[n])) for n in want), mix
    models = [cpu.patch(transformers.LlamaForCausalLM(tiny_llama_config(tie=True)).eval()),
              gpu.patch(transformers.LlamaForCausalLM(tiny_llama_config(tie=True)).eval().cuda())]
    ids = torch.randint(0, 96, (len(ROWS), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with cpu.rows(ROWS):
            want = models[0](ids).logits
        with gpu.rows(ROWS):
            got = models[1](ids.cuda()).logits.cpu()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # the base's matmuls run in cuBLAS there
