import numpy as np
import pytest

import deltapack as dp

torch = pytest.importorskip("torch")


@pytest.fixture(params=dp.simd_available())
def simd_path(request):
    """Run the test once per SIMD path this machine has (forced, then restored)."""
    dp.set_simd(request.param)
    yield request.param
    dp.set_simd("auto")


def make_delta(shape, dtype="f32", seed=0, scale=1e-3):
    """A delta with the heavy-ish tails of real fine-tune deltas, as numpy f32/f16 or torch bf16."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(df=4, size=shape) * scale).astype(np.float32)
    if dtype == "f32":
        return x
    if dtype == "f16":
        return x.astype(np.float16)
    return torch.from_numpy(x).to(torch.bfloat16)


def exact_f32(x) -> np.ndarray:
    """The exact float32 values of a numpy/torch f32/f16/bf16 array."""
    if isinstance(x, torch.Tensor):
        return x.float().numpy()
    return np.asarray(x, dtype=np.float32)


def bits(x) -> np.ndarray:
    """Raw bit patterns of a float array (numpy or torch), for bit-exact comparison."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16)
        x = x.numpy()
    x = np.asarray(x)
    return x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize])
