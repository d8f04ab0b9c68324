"""The fused LoRA linear (both backends) computes exactly the reference LoRA and its gradients.

Every backend is checked against a float64 evaluation of the plain formula on fresh random
inputs. The adapters are drawn so that the LoRA term is as large as the base term: an indexing
slip in the LoRA path (or in dA, dB) then moves the relative error by O(1), far above the
per-dtype rounding bounds below. The Triton kernels run under TRITON_INTERPRET=1 on a CPU
(tests/conftest.py), so shapes stay tiny.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import kernels

BACKENDS = ["torch", "triton", "triton-cublas"]
# relative Frobenius error allowed per dtype: a few units of rounding of the output dtype
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (x shape, out features, rank, bias): M=1, M and features not multiples of the 16-wide blocks,
# 3-D x, rank 1, ranks padded up to 32 and to 256
SHAPES = [
    ((1, 20), 24, 1, True),
    ((37, 33), 17, 8, False),
    ((2, 5, 24), 40, 32, True),
    ((3, 7, 18), 19, 200, False),
]


def _triton_or_skip(backend: str) -> None:
    if backend.startswith("triton"):
        pytest.importorskip("triton")


def _problem(x_shape, out_features, rank, dtype, bias=True, x=None):
    in_features = x_shape[-1]
    if x is None:
        x = torch.randn(*x_shape, dtype=dtype)
    weight = (torch.randn(out_features, in_features) / in_features**0.5).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    lora_a = (torch.randn(rank, in_features) / in_features**0.5).to(dtype)
    lora_b = (torch.randn(out_features, rank) / rank**0.5).to(dtype)
    scaling = float(torch.empty(()).uniform_(0.5, 2.0))
    return x.requires_grad_(), weight, b, lora_a.requires_grad_(), lora_b.requires_grad_(), scaling


def _reference64(x, weight, bias, lora_a, lora_b, scaling, dy, mask=None):
    """Output and (dx, dA, dB) of the plain formula in float64, with an explicit dropout mask."""

    def d(t):
        return None if t is None else t.detach().double().requires_grad_()

    x64, a64, b64 = d(x), d(lora_a), d(lora_b)
    dropped = x64 if mask is None else x64 * mask.double()
    y = F.linear(x64, d(weight), d(bias)) + scaling * F.linear(F.linear(dropped, a64), b64)
    grads = torch.autograd.grad(y, (x64, a64, b64), dy.double())
    return y.detach(), grads


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def _assert_matches(y, grads, y_ref, grads_ref, dtype) -> None:
    tol = REL_TOL[dtype]
    names = ("y", "dx", "dA", "dB")
    for name, got, want in zip(names, (y, *grads), (y_ref, *grads_ref), strict=True):
        assert got.shape == want.shape, name
        assert _rel(got, want) < tol, f"{name}: relative error {_rel(got, want):.2e} >= {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_shape,out_features,rank,bias", SHAPES)
def test_forward_and_gradients_match_float64_reference(
    backend, dtype, x_shape, out_features, rank, bias
):
    _triton_or_skip(backend)
    x, w, b, a, bb, s = _problem(x_shape, out_features, rank, dtype, bias=bias)
    y = kernels.lora_linear(x, w, b, a, bb, s, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    y_ref, grads_ref = _reference64(x, w, b, a, bb, s, dy)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    _assert_matches(y, grads, y_ref, grads_ref, dtype)


def test_torch_backend_is_exact_in_float64():
    x, w, b, a, bb, s = _problem((4, 9, 13), 11, 3, torch.float64)
    y = kernels.lora_linear(x, w, b, a, bb, s, backend="torch")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    _assert_matches(y, grads, *_reference64(x, w, b, a, bb, s, dy), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "permuted-3d", "sliced"])
def test_non_contiguous_x(backend, layout):
    _triton_or_skip(backend)
    if layout == "transposed":  # 2-D with strides (1, M): viewed as-is by the kernels
        raw = torch.randn(24, 19).t()
    elif layout == "permuted-3d":  # cannot be flattened without a copy
        raw = torch.randn(5, 3, 24).permute(1, 0, 2)
    else:  # every other feature column
        raw = torch.randn(19, 48)[:, ::2]
    assert not raw.is_contiguous()
    x, w, b, a, bb, s = _problem(tuple(raw.shape), 21, 4, torch.float32, x=raw)
    y = kernels.lora_linear(x, w, b, a, bb, s, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    _assert_matches(y, grads, *_reference64(x, w, b, a, bb, s, dy), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_when_x_needs_none(backend):
    """The first adapted layer sees an x without grad: dA and dB alone, still exact."""
    _triton_or_skip(backend)
    x, w, b, a, bb, s = _problem((13, 20), 18, 4, torch.float32)
    x = x.detach()
    rng_state = torch.get_rng_state()
    y = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.2, backend=backend)
    torch.set_rng_state(rng_state)
    mask = kernels.dropout_mask(x, 0.2, kernels.draw_dropout_seed(), backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (a, bb), dy)
    y_ref, (_, *grads_ref) = _reference64(x, w, b, a, bb, s, dy, mask=mask)
    for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
        assert _rel(got, want) < REL_TOL[torch.float32]


def test_frozen_base_gets_no_gradient():
    x, w, b, a, bb, s = _problem((6, 10), 8, 2, torch.float32)
    w.requires_grad_()
    b.requires_grad_()
    kernels.lora_linear(x, w, b, a, bb, s, backend="torch").sum().backward()
    assert w.grad is None and b.grad is None
    assert x.grad is not None and a.grad is not None and bb.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_mask_is_the_same_in_forward_and_backward(backend, dtype):
    """Gradients equal those of a reference built with the kernel's own mask, replayed from the
    same global seed: backward regenerated exactly the mask forward used."""
    _triton_or_skip(backend)
    x, w, b, a, bb, s = _problem((2, 19, 24), 20, 4, dtype)
    rng_state = torch.get_rng_state()
    y = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.3, backend=backend)
    torch.set_rng_state(rng_state)
    mask = kernels.dropout_mask(x.detach(), 0.3, kernels.draw_dropout_seed(), backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    y_ref, grads_ref = _reference64(x, w, b, a, bb, s, dy, mask=mask)
    _assert_matches(y, grads, y_ref, grads_ref, dtype)
    # and the mask really did something: without it the answer is far off
    y_nodrop, _ = _reference64(x, w, b, a, bb, s, dy)
    assert _rel(y, y_nodrop) > 4 * REL_TOL[dtype]  # dropout moves y by ~0.15-0.4 here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_both_triton_backends_train_alike(dtype):
    """'triton-cublas' moves the big GEMMs to cuBLAS but keeps the fused kernels' dropout: from
    one seed, the same mask and, up to rounding, the same output and gradients. The shape makes
    the masked-gradient sweep split every column strip across programs that each take several
    row tiles (16-row tiles under the interpreter)."""
    pytest.importorskip("triton")
    x, w, b, a, bb, s = _problem((70, 40), 24, 8, dtype)
    dy = torch.randn(70, 24, dtype=dtype)
    results = []
    for backend in ("triton", "triton-cublas"):
        torch.manual_seed(7)
        y = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.25, backend=backend)
        results.append((y, *torch.autograd.grad(y, (x, a, bb), dy)))
    for name, fused, split in zip(("y", "dx", "dA", "dB"), *results, strict=True):
        assert _rel(split, fused.double()) < REL_TOL[dtype], name


@pytest.mark.parametrize("backend", ["triton", "triton-cublas"])
def test_autotune_trials_leave_no_trace_in_the_gradients(backend, monkeypatch):
    """On a GPU the first call of each shape runs every config on the real arguments. Kernels
    that add into a tensor (dA and dB by atomics, dx in place) must zero or restore it between
    trials, or that step's gradients come out several times too large. Simulated under the
    interpreter: every kernel gets two configs and a timer that just runs them."""
    triton = pytest.importorskip("triton")
    from kernels import triton_backend as tb

    def run_once(kernel_call, quantiles=None, **_):
        kernel_call()
        return [1.0, 1.0, 1.0]

    for name in ("_lora_s_kernel", "_fwd_kernel", "_dy_pass_kernel", "_dx_kernel",
                 "_masked_grads_kernel"):  # fmt: skip
        tuner = getattr(tb, name)
        first = tuner.configs[-1]  # the small fallback tile on a GPU (doubled, it still fits)
        second = triton.Config({**first.kwargs, "BLOCK_M": 2 * first.kwargs["BLOCK_M"]})
        clone = triton.autotune(
            configs=[first, second], key=tuner.keys, reset_to_zero=tuner.reset_to_zero,
            restore_value=tuner.restore_value, do_bench=run_once,
        )(tuner.fn)  # fmt: skip
        monkeypatch.setattr(tb, name, clone)
    x, w, b, a, bb, s = _problem((37, 24), 20, 4, torch.float32)
    rng_state = torch.get_rng_state()
    y = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.3, backend=backend)
    torch.set_rng_state(rng_state)
    mask = kernels.dropout_mask(x.detach(), 0.3, kernels.draw_dropout_seed(), backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    y_ref, grads_ref = _reference64(x, w, b, a, bb, s, dy, mask=mask)
    _assert_matches(y, grads, y_ref, grads_ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_independence(backend, p):
    _triton_or_skip(backend)
    x = torch.empty(96, 80)
    seed = kernels.draw_dropout_seed()
    mask = kernels.dropout_mask(x, p, seed, backend=backend)
    kept = mask != 0
    # inverted dropout; the torch backend rounds p to a multiple of 1/65536
    assert torch.allclose(mask[kept], torch.tensor(1.0 / (1.0 - p)), rtol=1e-4)
    n = mask.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    # not the same pattern on every row or column (a broken offset would repeat it)
    assert (kept[0] != kept[1]).any() and (kept[:, 0] != kept[:, 1]).any()
    assert torch.equal(mask, kernels.dropout_mask(x, p, seed, backend=backend))
    assert not torch.equal(mask, kernels.dropout_mask(x, p, seed + 1, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_applies_no_dropout(backend):
    _triton_or_skip(backend)
    x, w, b, a, bb, s = _problem((9, 16), 12, 2, torch.float32)
    y = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.5, training=False, backend=backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    _assert_matches(y, grads, *_reference64(x, w, b, a, bb, s, dy), torch.float32)


def test_dropout_is_reproducible_under_manual_seed():
    x, w, b, a, bb, s = _problem((8, 16), 12, 2, torch.float32)
    torch.manual_seed(123)
    first = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.5)
    torch.manual_seed(123)
    again = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.5)
    other = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.5)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_full_size_is_saved_for_backward_but_x(backend):
    """No dropout mask, no drop(x), no fp32 copy of x: what autograd keeps is x itself, the
    frozen weight, the adapters and the thin S [M, r]; the torch backend adds its dropout mask
    bit-packed (uint8, 1 bit per element of x: 1/16 of x in bf16), nothing bigger."""
    _triton_or_skip(backend)
    x, w, b, a, bb, s = _problem((40, 33), 24, 4, torch.bfloat16)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.lora_linear(x, w, b, a, bb, s, dropout_p=0.1, backend=backend)
    packed = [t for t in saved if t.dtype == torch.uint8]
    if backend == "torch":
        assert [t.numel() for t in packed] == [(x.numel() + 7) // 8]
    else:
        assert packed == []
    saved = [t for t in saved if t.dtype != torch.uint8]
    x_sized = [t for t in saved if t.numel() >= x.numel()]
    assert [t.data_ptr() for t in x_sized] == [x.data_ptr()]
    assert all(t.dtype == torch.bfloat16 for t in saved)
    assert sum(t.numel() for t in saved) <= x.numel() + w.numel() + a.numel() + bb.numel() + 40 * 4


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.3, 0.5, 0.9999])
def test_bit_sliced_mask_is_the_16_bit_uniform_comparison(p):
    """The packed mask keeps exactly the elements whose 16-bit uniform (rebuilt bit by bit from
    the seed's planes) is at least round(p * 65536), and unpacks element 8i + j from bit j of
    byte i; the keep rate is then 1 - t / 65536 by construction."""
    from kernels._common import dropout_threshold
    from kernels.torch_backend import packed_keep_mask, uniform_bit_planes, unpack_scale

    numel, seed = 1000, 1234  # not a multiple of 64: the last word is padding
    planes, t = uniform_bit_planes(numel, p, seed, torch.device("cpu"))
    assert t == dropout_threshold(p)
    element = torch.arange(numel)
    bits = (planes[:, element // 64] >> (element % 64)) & 1  # [planes, numel], MSB first
    weights = 2 ** torch.arange(15, 15 - planes.shape[0], -1)
    u = (bits * weights.unsqueeze(-1)).sum(0)  # u with its undrawn low bits at 0
    packed = packed_keep_mask(numel, p, seed, torch.device("cpu"))
    assert packed.dtype == torch.uint8 and packed.numel() == numel // 8
    keep = unpack_scale(packed, (numel,), 0.0, torch.float32) == 1
    assert torch.equal(keep, u >= t)
    # the undrawn bits cannot matter: t has none below its lowest set bit
    assert t == 0 or t % 2 ** (16 - planes.shape[0]) == 0


def test_bit_packing_keeps_every_byte_pattern():
    """pack_keep's multiply-and-shift gathers each byte's bit without carries, for all 256
    patterns of 8 keep decisions, and the unpacking table reads them back in the same order."""
    from kernels.torch_backend import pack_keep, unpack_scale

    patterns = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # [256, 8], bit j
    packed = pack_keep(patterns.bool().reshape(-1))
    assert torch.equal(packed, torch.arange(256, dtype=torch.uint8))
    assert torch.equal(unpack_scale(packed, (256, 8), 0.5, torch.float32), patterns * 2.0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_compared_mask_draw_used_off_the_cpu(p, monkeypatch):
    """The draw the torch path uses on CUDA (whole 16-bit uniforms compared, then packed), run
    here on the CPU: the keep decisions are u >= t, the rate is right, and the layer's forward
    and gradients use exactly the mask ``dropout_mask`` reports."""
    import kernels.torch_backend as torch_backend
    from kernels._common import dropout_threshold

    monkeypatch.setattr(torch_backend, "packed_keep_mask", torch_backend._compared_keep_bytes)
    numel, seed = 96 * 80 + 3, 77
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 7) // 8 * 2,), generator=generator)
    u = words.view(torch.int16)[:numel].long() + 32768
    keep = torch_backend.unpack_scale(
        torch_backend.packed_keep_mask(numel, p, seed, torch.device("cpu")), (numel,), 0.0,
        torch.float32,
    ) == 1  # fmt: skip
    assert torch.equal(keep, u >= dropout_threshold(p))
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / numel) ** 0.5

    x, w, b, a, bb, s = _problem((2, 19, 24), 20, 4, torch.float32)
    rng_state = torch.get_rng_state()
    y = kernels.lora_linear(x, w, b, a, bb, s, dropout_p=p, backend="torch")
    torch.set_rng_state(rng_state)
    mask = kernels.dropout_mask(x.detach(), p, kernels.draw_dropout_seed(), backend="torch")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    _assert_matches(y, grads, *_reference64(x, w, b, a, bb, s, dy, mask=mask), torch.float32)


@pytest.mark.parametrize("rows_per_block", [8, 16, 1000])
@pytest.mark.parametrize("shape", [(96, 80), (7, 13), (3, 5, 11)])
def test_packed_mask_saved_by_forward_is_the_seeds_mask(shape, rows_per_block, monkeypatch):
    """What backward unpacks is exactly the mask regenerated from the seed (``dropout_mask``),
    odd element counts (a padded last byte) and x cut into several row blocks included; the
    gradients use it too."""
    import kernels.torch_backend as torch_backend

    monkeypatch.setattr(torch_backend, "_BLOCK_BYTES", rows_per_block * shape[-1] * 4)
    x = torch.randn(*shape, requires_grad=True)
    w, a = torch.randn(6, shape[-1]), torch.randn(2, shape[-1], requires_grad=True)
    bb = torch.randn(6, 2, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    rng_state = torch.get_rng_state()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernels.lora_linear(x, w, None, a, bb, 2.0, dropout_p=0.3, backend="torch")
    torch.set_rng_state(rng_state)
    seed = kernels.draw_dropout_seed()
    (packed,) = [t for t in saved if t.dtype == torch.uint8]
    from kernels.torch_backend import keep_mask, unpack_scale

    mask = kernels.dropout_mask(x.detach(), 0.3, seed, backend="torch")
    assert torch.equal(unpack_scale(packed, shape, 0.3, torch.float32), mask)
    keep, factor = keep_mask(shape, 0.3, seed, torch.float32, x.device)
    assert torch.equal(keep * factor, mask)
    torch.set_rng_state(rng_state)
    y = kernels.lora_linear(x, w, None, a, bb, 2.0, dropout_p=0.3, backend="torch")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, bb), dy)
    _assert_matches(y, grads, *_reference64(x, w, None, a, bb, 2.0, dy, mask=mask), torch.float32)


def test_inference_saves_nothing_and_matches_training_output():
    x, w, b, a, bb, s = _problem((5, 16), 12, 2, torch.float32)
    with torch.no_grad():
        y = kernels.lora_linear(x, w, b, a, bb, s)
    assert y.grad_fn is None
    assert torch.equal(y, kernels.lora_linear(x, w, b, a, bb, s).detach())


def test_adapters_in_fp32_with_bf16_activations_get_fp32_gradients():
    x, w, b, a, bb, s = _problem((7, 16), 12, 2, torch.bfloat16)
    a32 = a.detach().float().requires_grad_()
    b32 = bb.detach().float().requires_grad_()
    y = kernels.lora_linear(x, w, b, a32, b32, s, backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32


def test_auto_backend_runs_torch_on_cpu(monkeypatch):
    calls = []
    real = kernels.lora_linear_torch

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "lora_linear_torch", spy)
    with torch.device("cpu"):  # also where the suite runs with CUDA as the default device
        x, w, b, a, bb, s = _problem((3, 8), 8, 2, torch.float32)
    kernels.lora_linear(x, w, b, a, bb, s)
    assert len(calls) == 1


def test_auto_backend_takes_triton_on_cuda_only_from_enough_tokens():
    """Few tokens are launch-bound: cuBLAS through the torch path is faster there."""
    from kernels import _resolve_backend

    class FakeCuda:
        is_cuda = True

        def __init__(self, *shape):
            self.shape = shape

        def numel(self):
            return int(torch.tensor(self.shape).prod())

    small, large = FakeCuda(4, 100, 64), FakeCuda(kernels.TRITON_MIN_TOKENS, 64)
    assert _resolve_backend("auto", small) == "torch"
    expected = "triton" if importlib.util.find_spec("triton") else "torch"
    assert _resolve_backend("auto", large) == expected
    assert _resolve_backend("triton", small) == "triton"  # an explicit choice is kept


def _bad(**overrides):
    x, w, b, a, bb, s = _problem((4, 8), 6, 2, torch.float32)
    args = {"x": x, "weight": w, "bias": b, "lora_a": a, "lora_b": bb, "scaling": s}
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"x": torch.randn(4, 9)}, "input features"),
        ({"weight": torch.randn(6, 8, 1)}, "weight must be 2-D"),
        ({"lora_a": torch.randn(2, 7)}, "lora_a must be"),
        ({"lora_a": torch.randn(0, 8), "lora_b": torch.randn(6, 0)}, "rank must be in"),
        ({"lora_a": torch.randn(257, 8), "lora_b": torch.randn(6, 257)}, "rank must be in"),
        ({"lora_b": torch.randn(6, 3)}, "lora_b must be"),
        ({"bias": torch.randn(5)}, "bias must be"),
        ({"x": torch.randint(0, 3, (4, 8))}, "dtype"),
        ({"weight": torch.randn(6, 8, dtype=torch.float16)}, "weight has dtype"),
        ({"lora_a": torch.randint(0, 3, (2, 8))}, "floating point"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        kernels.lora_linear(**_bad(**overrides))


def test_a_strided_view_whose_offsets_overflow_int32_is_copied_first(monkeypatch):
    """The kernels compute offsets as row * stride in int32, so a row slice of a wider tensor
    can overflow with fewer than 2**31 elements: such an x is made contiguous (its elements fit)
    before the kernels see it. Shown with the limit lowered to the view's size."""
    pytest.importorskip("triton")
    from kernels import triton_backend as tb

    huge = torch.empty_strided((4, 8), (2**31, 1), device="meta")  # 32 elements, offsets > 2**31
    assert tb._extent(huge) > tb._MAX_OFFSET >= huge.numel()
    assert tb._addressable(huge).is_contiguous()
    assert tb._addressable(torch.empty(4, 8)).is_contiguous()

    wide = torch.randn(13, 48)
    x = wide[:, :20]  # rows 48 apart: offsets up to 12 * 48 + 19 = 595 for 260 elements
    _, w, b, a, bb, s = _problem((13, 20), 18, 4, torch.float32)
    monkeypatch.setattr(tb, "_MAX_OFFSET", 400)  # every tensor fits, the view's offsets not
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = kernels.lora_linear(x, w, b, a, bb, s, backend="triton")
    assert any(t.shape == x.shape and t.is_contiguous() for t in saved)  # the copy went in
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (a, bb), dy)
    y_ref, (_, *grads_ref) = _reference64(x, w, b, a, bb, s, dy)
    for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
        assert _rel(got, want) < REL_TOL[torch.float32]


def test_triton_backend_rejects_float64():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="float64"):
        kernels.lora_linear(*_problem((4, 8), 6, 2, torch.float64), backend="triton")


def test_kernels_package_stays_independent_of_the_training_stack():
    """``kernels`` imports only torch (and triton, lazily, in the Triton backend), and has no
    ``__version__`` that would make transformers take it for Hugging Face's ``kernels``."""
    import ast
    from pathlib import Path

    forbidden = {"lora_lightning", "lightning", "transformers", "peft"}
    for path in Path(kernels.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{path.name}:{node.lineno} imports {roots}"
            if "triton" in roots:
                assert path.name == "triton_backend.py", f"{path.name}:{node.lineno}"
    assert not hasattr(kernels, "__version__")


_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.triton_backend as tb

FLOATS = {"scale", "inv_keep", "scaling"}


def compile_h100(kernel, dtype, constants, fp32_ptrs=(), options=None, rank=16):
    # Specialised as the JIT does for a real call at 8192 tokens x 4096 x 4096 (contiguous):
    # pointers and sizes divisible by 16 get `tt.divisibility`, unit strides become constants.
    # That is what lets Triton pipeline the loads, and it sets the shared memory a config takes.
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    m, n, k = 8192, 4096, 4096
    values = dict(M=m, N=n, K=k, R=rank, M_BUCKET=m, seed=12345, threshold=6554)
    last_axis = {"x": "k", "w": "k", "a": "k", "b": "r", "s": "r", "y": "n", "dy": "n",
                 "ds": "r", "dx": "k", "da": "k", "db": "r"}  # every tensor is contiguous
    length = {"k": k, "n": n, "r": rank}
    names = fn.arg_names
    for name in names:
        if name.startswith("stride_"):  # stride_<tensor><axis>: rows step over the last axis
            tensor, axis = name[len("stride_"):-1], name[-1]
            last = last_axis[tensor]
            values[name] = 1 if axis == last else length[last]
    consts, signature, attrs = dict(constants), {}, {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_ptrs else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            signature[name] = "fp32"
        elif values[name] == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    return triton.compile(source, target=target, options=options or {"num_warps": 4})

for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
    common = {"PRECISION": precision, "BLOCK_R": 16, "BLOCK_M": 32}
    compile_h100(tb._lora_s_kernel, dtype, {**common, "HAS_DROPOUT": True, "BLOCK_K": 32})
    compile_h100(tb._fwd_kernel, dtype, {**common, "HAS_BIAS": True, "BLOCK_N": 32,
                                         "BLOCK_K": 32, "GROUP_M": 4})
    compile_h100(tb._dy_pass_kernel, dtype, {**common, "BLOCK_N": 32}, fp32_ptrs=("db_ptr",))
    compile_h100(tb._dx_kernel, dtype, {**common, "HAS_DROPOUT": True, "NEED_DX": True,
                                        "NEED_DA": True, "BLOCK_N": 32, "BLOCK_K": 32,
                                        "GROUP_M": 4}, fp32_ptrs=("da_ptr",))
    compile_h100(tb._masked_grads_kernel, dtype, {**common, "NEED_DX": True, "NEED_DA": True,
                                                  "BLOCK_K": 32}, fp32_ptrs=("da_ptr",))
    compile_h100(tb._mask_kernel, dtype, {"BLOCK_M": 64, "BLOCK_K": 64})
print("compiled")
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_h100_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (types, layouts), so compile every
    kernel, dropout variants included, to an sm_90 cubin with Triton's bundled ptxas."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


_SMEM_SCRIPT = _AOT_SCRIPT.split("for dtype, precision in")[0] + r"""
def shared_of(kernel, dtype, constants, fp32_ptrs, config, rank):
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return compile_h100(kernel, dtype, constants, fp32_ptrs, options, rank).metadata.shared

CHECKS = [  # kernel, reduce, out, resident, lora_first, constants, fp32 ptrs, (dtype, rank, config)
    (tb._lora_s_kernel, "BLOCK_K", None, "x", False, {"HAS_DROPOUT": True}, (),
     [("fp32", 16, 0), ("bf16", 16, 1)]),
    (tb._fwd_kernel, "BLOCK_K", "BLOCK_N", None, False, {"HAS_BIAS": True}, (),
     [("fp32", 16, 3), ("bf16", 16, 3), ("bf16", 256, 4)]),
    (tb._dy_pass_kernel, "BLOCK_N", None, "s", False, {}, ("db_ptr",),
     [("fp32", 16, 0), ("bf16", 16, 0), ("bf16", 256, 2)]),
    (tb._dx_kernel, "BLOCK_N", "BLOCK_K", None, True, {"HAS_DROPOUT": True, "NEED_DX": True,
                                                        "NEED_DA": True}, ("da_ptr",),
     [("fp32", 16, 4), ("bf16", 16, 4), ("bf16", 256, 3)]),
]
SIZES = {"bf16": (2, "tf32"), "fp32": (4, "ieee")}
for kernel, reduce, out, resident, lora_first, constants, fp32_ptrs, cases in CHECKS:
    configs = (tb._gemm_configs(reduce, out, interpret=False) if out
               else tb._thin_configs(reduce, interpret=False))
    for dtype, rank, which in cases:
        size, precision = SIZES[dtype]
        config = configs[which]
        real = shared_of(kernel, dtype, {"PRECISION": precision, "BLOCK_R": rank, **constants,
                                         **config.kwargs}, fp32_ptrs, config, rank)
        formula = tb.shared_memory_bytes(config, reduce, out, rank, size, resident, lora_first)
        exact = out is not None or (kernel is tb._lora_s_kernel and size == 4)
        print(kernel.fn.__name__, dtype, rank, real, formula, "exact" if exact else "bound")
        assert formula == real if exact else formula <= real, (kernel.fn.__name__, dtype, rank)
# _masked_grads (cuBLAS main loops): exact in fp32, a lower bound in 16-bit dtypes
for dtype, rank, which in (("fp32", 16, 3), ("bf16", 16, 0), ("bf16", 256, 3)):
    size, precision = SIZES[dtype]
    config = tb._stream_configs(interpret=False)[which]
    real = shared_of(tb._masked_grads_kernel, dtype, {"PRECISION": precision, "BLOCK_R": rank,
                     "NEED_DX": True, "NEED_DA": True, **config.kwargs}, ("da_ptr",), config,
                     rank)
    formula = tb.stream_shared_memory_bytes(config, rank, size)
    print("_masked_grads", dtype, rank, real, formula)
    assert formula == real if size == 4 else formula <= real, (dtype, rank)
print("measured")
"""


@pytest.mark.slow
def test_the_shared_memory_formula_that_prunes_autotune_configs_is_the_compilers():
    """`shared_memory_bytes` decides which configs are compiled at all (an fp32 rank-256 call
    compiled 2-minute configs only to fail at launch): compiled for H100, a config's shared
    memory is the formula's for the fp32 GEMMs and `_lora_s`, and never below it elsewhere."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _SMEM_SCRIPT], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "measured" in done.stdout, (done.stdout + done.stderr)[-3000:]


@pytest.mark.parametrize(
    ("dtype", "rank", "tuned"),
    [  # tuned configs that fit, per kernel: forward GEMM, dx GEMM, thin pass, masked sweep
        (torch.bfloat16, 16, (5, 5, 4, 4)),  # every tuned config fits
        (torch.bfloat16, 256, (5, 2, 4, 4)),  # dx's LoRA prologue adds 98-192 KB to its pipeline
        (torch.float32, 16, (5, 5, 4, 4)),  # 144-192 KB of 227
        (torch.float32, 256, (0, 0, 0, 0)),  # minutes to compile, several too large: the fallback
    ],
)
@pytest.mark.parametrize("kernel", ["fwd", "dx", "thin", "stream"])
def test_autotune_times_what_fits_and_keeps_the_fallback(dtype, rank, tuned, kernel):
    """The autotuner only compiles configs that can fit in shared memory, always beside the
    small fallback (the one that still launches if a tuned config runs out of resources, which
    the autotuner then skips), and the fallback alone for fp32 at rank >= 128 (its tuned tiles
    took 26-166 s each to compile for sm_90, the fallback 1.5-3.5 s)."""
    pytest.importorskip("triton")
    from kernels import triton_backend as tb

    families = {
        "fwd": (tb._gemm_configs("BLOCK_K", "BLOCK_N", interpret=False),
                tb.prune_configs("BLOCK_K", "BLOCK_N"),
                lambda c, r, e: tb.shared_memory_bytes(c, "BLOCK_K", "BLOCK_N", r, e)),
        "dx": (tb._gemm_configs("BLOCK_N", "BLOCK_K", interpret=False),
               tb.prune_configs("BLOCK_N", "BLOCK_K", lora_first=True),
               lambda c, r, e: tb.shared_memory_bytes(c, "BLOCK_N", "BLOCK_K", r, e,
                                                      lora_first=True)),
        "thin": (tb._thin_configs("BLOCK_N", interpret=False),
                 tb.prune_configs("BLOCK_N", resident="s"),
                 lambda c, r, e: tb.shared_memory_bytes(c, "BLOCK_N", None, r, e, "s")),
        "stream": (tb._stream_configs(interpret=False), tb.prune_stream_configs,
                   tb.stream_shared_memory_bytes),
    }  # fmt: skip
    configs, prune, size = families[kernel]
    expected = tuned[list(families).index(kernel)]
    x = torch.empty(8, 8, dtype=dtype)
    pruned = prune(configs, {"x_ptr": x}, BLOCK_R=rank)
    fallback = [c for c in pruned if tb.is_fallback(c)]
    assert len(pruned) - len(fallback) == expected
    assert len(fallback) == 1
    assert all(size(c, rank, x.element_size()) <= tb._FALLBACK_SMEM for c in pruned)
    # nothing fits: the smallest config is still compiled rather than none
    assert len(prune(configs, {"x_ptr": x}, BLOCK_R=4096)) == 1


def test_every_config_survives_tritons_autotune_disk_cache():
    """With TRITON_CACHE_AUTOTUNING=1 Triton stores each timed config as the JSON of its
    __dict__ and reads it back as `Config(**d)`: nothing of ours may ride on a Config (a marker
    attribute on the fallback would crash the next process to read the cache)."""
    triton = pytest.importorskip("triton")
    import json

    from kernels import triton_backend as tb

    for configs in (tb._gemm_configs("BLOCK_K", "BLOCK_N", interpret=False),
                    tb._thin_configs("BLOCK_N", interpret=False),
                    tb._stream_configs(interpret=False)):  # fmt: skip
        assert sum(tb.is_fallback(c) for c in configs) == 1
        for config in configs:
            rebuilt = triton.Config(**json.loads(json.dumps(config.__dict__)))
            assert str(rebuilt) == str(config)


def test_mixed_precision_autocast_runs_in_the_autocast_dtype():
    """Lightning's bf16-mixed wraps steps in autocast: the layer must follow it, not crash."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    weight, bias = torch.randn(12, 16), torch.randn(12)
    lora_a = torch.randn(4, 16, requires_grad=True)
    lora_b = torch.randn(12, 4, requires_grad=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = kernels.lora_linear(x, weight, bias, lora_a, lora_b, 0.5, backend="torch")
    assert y.dtype == torch.bfloat16
    ref = kernels.lora_linear_reference(x.double(), weight.double(), bias.double(),
                                        lora_a.double(), lora_b.double(), 0.5)
    assert (y.double() - ref).norm() / ref.norm() < 2e-2
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lora_a.grad.dtype == torch.float32
    assert lora_b.grad is not None and torch.isfinite(lora_b.grad).all()
