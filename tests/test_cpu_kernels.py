"""The fused CPU decode kernels (``engine/cpu_kernels.c``) against PyTorch's arithmetic.

Each kernel is checked against the PyTorch path it replaces, on the shapes it specialises for
(the embedded model's 9 query heads over 3 key/value heads of 64) and on a generic shape, with
rows of every length (shorter than one vector block, exact blocks, partial blocks), holes in the
valid columns, and rows not starting at slot 0.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as F

from softprompt.engine import cpu_kernels
from softprompt.engine.kv_cache import SlotCache
from softprompt.engine.lean import _Attention, _normalise


@pytest.fixture(scope="module")
def kernels() -> cpu_kernels.CpuKernels:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: the engine runs PyTorch's kernels")
    loaded = cpu_kernels.load()
    assert loaded is not None, "a C compiler is here but the kernels did not build"
    return loaded


def decode_attention(
    kernels: cpu_kernels.CpuKernels,
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    end: int,
    heads: int,
    scaling: float,
) -> torch.Tensor:
    """One decode step's attention through the kernel, writing the new key/value at column
    ``end``, as the engine's ``DecodeStep`` calls it for one layer (keys stored transposed)."""
    cpu_kernels._check(qkv)
    batch, _, _, dim = keys.shape
    step = cpu_kernels.DecodeStep(
        kernels, [keys], [values], valid, slice(0, batch), end, {None: (cos, sin)}, heads
    )
    out = torch.empty(batch, heads * dim)
    step.attention(0, qkv, scaling, out=out)
    return out


def _rotary(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inverse = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = positions.float()[:, None] * inverse[None]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "end"),
    [(9, 3, 64, 100), (9, 3, 64, 64), (6, 2, 24, 37), (4, 4, 64, 5)],
)
def test_decode_attention_equals_the_torch_path(kernels, heads, kv_heads, dim, end, dtype):
    """In float32, and over a bfloat16 cache (read widened, the new key and value written
    rounded to nearest even as PyTorch rounds, arithmetic in float32)."""
    generator = torch.Generator().manual_seed(end)
    slots, batch, capacity = 12, 10, end + 3
    cache = SlotCache(1, kv_heads, dim, slots, capacity, dtype=dtype, device="cpu")
    for buffer in (cache.keys[0], cache.values[0]):
        buffer.copy_(torch.randn(buffer.shape, generator=generator))
    # Row lengths from 1 to all columns (inside a vector block, exact blocks, partial ones),
    # some with a hole (a padded gap between a prefix and the text).
    lengths = [1, 2, 15, 16, 17, 32, 33, end, end - 1, max(end // 2, 1)][:batch]
    for row, length in enumerate(lengths, start=1):
        cache.valid[row, end - length : end] = True
        if length > 6:
            cache.valid[row, end - length + 2 : end - length + 4] = False
    rows = slice(1, 1 + batch)
    cache.valid[rows, end] = True
    cache.valid[3, end] = False  # a new token marked invalid (padding) still sees itself
    cache.end, cache.rows = end, rows
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=generator)
    cos, sin = _rotary(torch.randint(0, 500, (batch,), generator=generator), dim)
    half = dim // 2
    signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    scaling = dim**-0.5

    # The PyTorch path (LeanDecoder.layers_forward's arithmetic): rotate, write, attend.
    keys, values = cache.keys[0].clone(), cache.values[0].clone()
    split = qkv.view(batch, 1, heads + 2 * kv_heads, dim)
    qk = split[:, :, : heads + kv_heads]
    qk = torch.addcmul(qk * cos[:, None, None], qk.roll(half, dims=-1), signed[:, None, None])
    keys[rows, :, end : end + 1] = qk[:, :, heads:].transpose(1, 2)
    values[rows, :, end : end + 1] = split[:, :, heads + kv_heads :].transpose(1, 2)
    mask = cache.mask(rows, 1)
    attend = _Attention(mask, heads, kv_heads, dim, 1)
    q = qk[:, :, :heads].transpose(1, 2)
    expected = attend(
        q, keys[rows, :, : end + 1].float(), values[rows, :, : end + 1].float(), scaling
    )[:, 0]

    valid_before = cache.valid.clone()
    # The per-step form the engine uses (checked once, then addressed by layer and row offset),
    # on a copy of the cache: the same numbers, the same writes.
    twin = SlotCache(1, kv_heads, dim, slots, capacity, dtype=dtype, device="cpu")
    twin.keys[0].copy_(cache.keys[0])
    twin.values[0].copy_(cache.values[0])
    twin.valid.copy_(cache.valid)
    step = cpu_kernels.DecodeStep(
        kernels, twin.keys, twin.values, twin.valid, rows, end, {None: (cos, signed)}, heads
    )
    stepped = torch.empty(batch, heads * dim)
    step.attention(0, qkv, scaling, out=stepped)
    with pytest.raises(ValueError, match="expected a contiguous float32"):
        step.attention(0, qkv[:, :-1], scaling, out=stepped)
    got = decode_attention(
        kernels,
        qkv,
        cos,
        signed,
        cache.keys[0][rows],
        cache.values[0][rows],
        cache.valid[rows],
        end,
        heads,
        scaling,
    )
    assert got.shape == (batch, heads * dim) and got.dtype == torch.float32
    # bfloat16: the new key is rotated in float32 by both, but may round to a neighbouring
    # bfloat16 where the two rotations differ in their last float32 bits.
    close = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=close, atol=close)
    # The new keys and values are in the cache, and nothing else changed.
    close = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(cache.keys[0], keys, rtol=close, atol=close)
    assert torch.equal(cache.values[0], values)
    assert torch.equal(cache.valid, valid_before)
    assert torch.equal(cache.keys[0][0], keys[0]) and torch.equal(cache.keys[0][-1], keys[-1])
    assert torch.equal(stepped, got)
    assert torch.equal(twin.keys[0], cache.keys[0]) and torch.equal(twin.values[0], cache.values[0])


def test_decode_attention_refuses_a_column_past_the_cache(kernels):
    cache = SlotCache(1, 1, 8, 2, 4, dtype=torch.float32, device="cpu")
    qkv, cos = torch.zeros(2, 24), torch.ones(2, 8)
    with pytest.raises(ValueError, match="out of range"):
        decode_attention(
            kernels, qkv, cos, cos, cache.keys[0], cache.values[0], cache.valid, 4, 1, 1.0
        )
    with pytest.raises(ValueError, match="float32"):
        decode_attention(
            kernels, qkv.double(), cos, cos, cache.keys[0], cache.values[0], cache.valid, 3, 1, 1.0
        )


@pytest.mark.parametrize("width", [576, 37])
def test_add_normalise_equals_residual_add_then_rms_norm(kernels, width):
    generator = torch.Generator().manual_seed(width)
    h = torch.randn(64, width, generator=generator) * 3
    delta = torch.randn(64, width, generator=generator)
    expected_h = h + delta
    expected = _normalise(expected_h, 1e-5)
    out = torch.full_like(h, float("nan"))
    got = kernels.add_normalise(h, delta, 1e-5, out=out)
    assert got is out
    assert torch.equal(h, expected_h)  # the residual stream is updated in place
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    alone = kernels.add_normalise(h.clone(), None, 1e-5)
    torch.testing.assert_close(alone, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="output buffer"):
        kernels.add_normalise(h, delta, 1e-5, out=torch.empty(64, width + 1))
    # Gemma's norms on the residual branch keep their weight (here already offset, 1 + w).
    weight = torch.randn(width, generator=generator)
    weighted = kernels.add_normalise(h.clone(), None, 1e-5, weight=weight)
    torch.testing.assert_close(weighted, expected * weight, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight vector"):
        kernels.add_normalise(h.clone(), None, 1e-5, weight=weight[:-1])


def test_silu_mul_equals_swiglu_across_the_float_range(kernels):
    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(64, 1536, generator=generator) * 8
    gate[0, :6] = torch.tensor([-200.0, -88.0, -30.0, 0.0, 30.0, 200.0])
    up = torch.randn(64, 1536, generator=generator)
    got = kernels.silu_mul(torch.cat((gate, up), dim=-1))
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=2e-6, atol=1e-30)
    nan = kernels.silu_mul(torch.tensor([[float("nan"), 1.0]]))
    assert torch.isnan(nan).all()
    # Soft caps (Gemma 2's logits and scores), in place, across the float range.
    capped = kernels.softcap(gate.clone(), 30.0)
    torch.testing.assert_close(capped, torch.tanh(gate / 30.0) * 30.0, rtol=2e-6, atol=2e-6)
    # GeGLU (Gemma): GELU's tanh approximation in place of SiLU.
    geglu = kernels.silu_mul(torch.cat((gate, up), dim=-1), gelu=True)
    torch.testing.assert_close(geglu, F.gelu(gate, approximate="tanh") * up, rtol=2e-6, atol=1e-6)


def test_a_decode_steps_kernels_take_bfloat16_in_and_out(kernels):
    """On the bfloat16 path the linear layers read and write bfloat16: add_normalise reads its
    delta and writes its output in bfloat16 (the residual stream stays float32), silu_mul and
    attention read and write bfloat16; each equals the float32 kernel on the widened input,
    rounded to nearest even once at the end."""
    generator = torch.Generator().manual_seed(3)
    slots, heads, kv_heads, dim, end = 4, 9, 3, 64, 20
    cache = SlotCache(1, kv_heads, dim, slots, end + 1, dtype=torch.bfloat16, device="cpu")
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    cache.valid[:, :end] = True
    cos, sin = _rotary(torch.arange(slots) + end, dim)
    rows = slice(0, slots)
    twins = []
    for _ in range(2):
        twin = SlotCache(1, kv_heads, dim, slots, end + 1, dtype=torch.bfloat16, device="cpu")
        twin.keys[0].copy_(cache.keys[0])
        twin.values[0].copy_(cache.values[0])
        twin.valid.copy_(cache.valid)
        twins.append(twin)
    tables = {None: (cos, sin)}
    steps = [
        cpu_kernels.DecodeStep(kernels, t.keys, t.values, t.valid, rows, end, tables, heads)
        for t in twins
    ]
    qkv = torch.randn(slots, (heads + 2 * kv_heads) * dim, generator=generator).bfloat16()
    wide_out = torch.empty(slots, heads * dim)
    steps[0].attention(0, qkv.float(), 0.125, out=wide_out)
    narrow_out = torch.empty(slots, heads * dim, dtype=torch.bfloat16)
    steps[1].attention(0, qkv, 0.125, out=narrow_out)
    assert torch.equal(narrow_out, wide_out.bfloat16())
    assert torch.equal(twins[0].keys[0], twins[1].keys[0])
    with pytest.raises(ValueError, match="bfloat16"):
        steps[1].attention(0, qkv, 0.125, out=wide_out)  # out must match qkv

    h = torch.randn(slots, 576, generator=generator) * 3
    delta = torch.randn(slots, 576, generator=generator).bfloat16()
    wide_h, wide = h.clone(), torch.empty(slots, 576)
    steps[0].add_normalise(wide_h, delta.float(), 1e-5, out=wide)
    narrow = torch.empty(slots, 576, dtype=torch.bfloat16)
    steps[1].add_normalise(h, delta, 1e-5, out=narrow)
    assert torch.equal(h, wide_h) and torch.equal(narrow, wide.bfloat16())

    gate_up = (torch.randn(slots, 2 * 1536, generator=generator) * 4).bfloat16()
    wide_act = torch.empty(slots, 1536)
    steps[0].silu_mul(gate_up.float(), out=wide_act)
    narrow_act = torch.empty(slots, 1536, dtype=torch.bfloat16)
    steps[1].silu_mul(gate_up, out=narrow_act)
    assert torch.equal(narrow_act, wide_act.bfloat16())


@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    [(64, 576, 960), (61, 576, 3072), (1, 1536, 576), (13, 33, 49), (6, 5, 16), (7, 3, 17)],
)
def test_panel_linear_equals_the_matrix_product(kernels, rows, in_features, out_features):
    # Every tile shape: full 6-row tiles and each remainder (1..5 rows), full and partial
    # panels of 16 columns.
    generator = torch.Generator().manual_seed(rows * out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    panels = cpu_kernels.weight_panels(weight)
    assert panels.shape == (-(-out_features // 16), in_features, 16)
    got = kernels.panel_linear(x, panels, out_features)
    expected = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # Leading dimensions are kept, like F.linear's; a non-contiguous x is read correctly.
    wide = torch.randn(2, 3, in_features * 2, generator=generator)[..., ::2]
    torch.testing.assert_close(
        kernels.panel_linear(wide, panels, out_features),
        F.linear(wide, weight),
        rtol=1e-5,
        atol=1e-4,
    )


def test_panel_linear_refuses_panels_of_another_weight(kernels):
    panels = cpu_kernels.weight_panels(torch.randn(32, 8))
    with pytest.raises(ValueError, match="panels do not match"):
        kernels.panel_linear(torch.randn(4, 9), panels, 32)
    with pytest.raises(ValueError, match="panels do not match"):
        kernels.panel_linear(torch.randn(4, 8), panels, 48)


def test_a_packed_linear_on_panels_keeps_only_that_copy(kernels):
    from softprompt.engine.packed import PackedLinear

    linear = torch.nn.Linear(40, 24)
    x = torch.randn(5, 40)
    packed = PackedLinear.of(linear, full_batch=5)
    packed.use_panels(kernels)
    torch.testing.assert_close(packed(x), linear(x).detach(), rtol=1e-5, atol=1e-5)
    packed.keep_only(panels=True)
    assert packed.packed is None and packed.batch_packed is None
    assert packed.nbytes() == 2 * 40 * 16 * 4  # two panels of 16 columns
    torch.testing.assert_close(packed(x), linear(x).detach(), rtol=1e-5, atol=1e-5)
    other = PackedLinear.of(linear)
    other.use_panels(kernels)
    other.use_panels(None)
    other.keep_only(panels=False)
    assert other.panels is None and other.nbytes() > 0
    torch.testing.assert_close(other(x), linear(x).detach(), rtol=1e-5, atol=1e-5)


def test_load_builds_once_into_the_cache_and_falls_back_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    cpu_kernels.load.cache_clear()
    try:
        if shutil.which("cc") or shutil.which("gcc"):
            assert cpu_kernels.load() is not None
            built = list((tmp_path / "kernels").iterdir())
            assert [p.suffix for p in built] == [".so"]  # no scratch file left behind
        cpu_kernels.load.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "elsewhere"))
        assert cpu_kernels.load() is None
        cpu_kernels.load.cache_clear()
        monkeypatch.delenv("CC")
        monkeypatch.setenv("SOFTPROMPT_CPU_KERNELS", "0")
        assert cpu_kernels.load() is None
        assert not (tmp_path / "elsewhere" / "kernels").exists()
    finally:
        cpu_kernels.load.cache_clear()
