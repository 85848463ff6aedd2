"""ONNX translations of the rq ops: exported with torch.onnx (dynamo), run in onnxruntime, equal to the reference.

Codes must match the reference exactly except at decision ties (float sums in a different order can land a value on
the other side of a boundary); the rate is bounded. Norms are fp16, so such a tie can also flip one fp16 ulp.
Reconstruction and attention are compared tightly against the reference fed the same codes.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import onnx
import pytest
import torch

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import ties  # noqa: E402  (tests/ is on sys.path)

from rqcompile import ops  # noqa: E402,F401
from rqcompile.config import SCALE_SEARCH, RQConfig  # noqa: E402
from rqcompile.export.onnx_ops import export_onnx  # noqa: E402
from rqcompile.export.tensorrt_check import check_tensorrt  # noqa: E402
from rqcompile.ops import layout_args, quantize_state  # noqa: E402
from rqcompile.quant.packing import unpack  # noqa: E402
from rqcompile.quant.quantizer import QuantState, dequantize, make_state, quantize, rotated_attention  # noqa: E402

HEAD_DIM = 64
MAX_CODE_MISMATCH = 1e-3


class QuantizeDequantize(torch.nn.Module):
    """Quantizes its input with one QuantState and reconstructs it: the cache write and read of one layer."""

    def __init__(self, state: QuantState, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.bits, _, self.widths = layout_args(state)
        self.group, self.dtype = state.group, dtype
        for name, tensor in state.tensors().items():
            self.register_buffer(name, tensor)

    def layout(self) -> tuple:
        """A mixed layout's trailing (perm, widths) op arguments; none for a uniform state (the original calls)."""
        return () if self.widths is None else (getattr(self, "perm", None), self.widths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, norms = torch.ops.rq.quantize(
            x, self.rotation, self.mean, self.scale, self.levels, self.bits, self.group, *self.layout()
        )
        recon = torch.ops.rq.dequantize(
            codes,
            norms,
            self.rotation,
            self.mean,
            self.scale,
            self.levels,
            self.bits,
            x.shape[-1],
            self.dtype,
            *self.layout(),
        )
        return codes, norms, recon


class CompressedAttention(torch.nn.Module):
    """rq::attention over packed K/V inputs (the decode step of one layer)."""

    def __init__(self, k: QuantState, v: QuantState, sm_scale: float = 0.125) -> None:
        super().__init__()
        (self.k_bits, _, self.k_widths), (self.v_bits, _, self.v_widths) = layout_args(k), layout_args(v)
        self.sm_scale = sm_scale
        for prefix, state in (("k_", k), ("v_", v)):
            for name, tensor in state.tensors().items():
                self.register_buffer(prefix + name, tensor)

    def layout(self) -> tuple:
        """(kv_len, k_perm, v_perm, k_widths, v_widths) for mixed layouts; none when both are uniform."""
        if self.k_widths is None and self.v_widths is None:
            return ()
        perms = (getattr(self, "k_perm", None), getattr(self, "v_perm", None))
        return (None, *perms, self.k_widths, self.v_widths)

    def forward(self, q, k_codes, k_norms, v_codes, v_norms, mask=None):
        return torch.ops.rq.attention(
            q,
            k_codes,
            k_norms,
            v_codes,
            v_norms,
            self.k_rotation,
            self.k_scale,
            self.k_levels,
            self.v_rotation,
            self.v_mean,
            self.v_scale,
            self.v_levels,
            self.k_bits,
            self.v_bits,
            mask,
            self.sm_scale,
            *self.layout(),
        )


def _export(module, args, path, flavour, dynamic_shapes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(module, args, path, flavour=flavour, dynamic_shapes=dynamic_shapes)


def _run(path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: inputs[n].numpy() for n in names})]


def _calibrated(state: QuantState, gen: torch.Generator) -> QuantState:
    """Non-trivial mean/scale so the translations are checked on them too."""
    heads, dim = state.mean.shape
    return replace(
        state,
        mean=torch.randn(heads, dim, generator=gen) * 0.2,
        scale=torch.rand(heads, dim, generator=gen) + 0.5,
    )


@pytest.mark.parametrize(
    "flavour,backend,bits,group,dtype,search",
    [
        ("standard", "planar", 2, 64, torch.float32, False),
        ("standard", "iso", 3, 32, torch.float32, False),
        ("standard", "rotor", 4, 64, torch.float32, False),  # 64 % 3 == 1: padded rotor blocks
        ("standard", "hadamard", 3, 32, torch.float16, False),  # dense 32x32 blocks: the MatMul rotation path
        ("tensorrt", "planar", 2, 32, torch.float32, False),
        ("tensorrt", "iso", 4, 64, torch.float32, False),
        ("tensorrt", "rotor", 3, 64, torch.float32, False),
        ("tensorrt", "hadamard", 4, 64, torch.float16, False),
        ("standard", "iso", 3, 64, torch.float32, True),  # scale search: candidates after the codebook
        ("tensorrt", "planar", 4, 32, torch.float32, True),
    ],
)
def test_quantize_dequantize_match_the_reference(tmp_path, flavour, backend, bits, group, dtype, search):
    gen = torch.Generator().manual_seed(bits * 7 + group)
    config = RQConfig(backend=backend, bits=bits, norm_group=group, scale_search=SCALE_SEARCH if search else ())
    state = _calibrated(make_state(config, layer_idx=1, kind="k", num_heads=2, head_dim=HEAD_DIM), gen)
    module = QuantizeDequantize(state, dtype).eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("tokens")}
    path = _export(module, (torch.randn(2, 2, 5, HEAD_DIM),), tmp_path / "qd.onnx", flavour, (dims,))

    x = torch.randn(3, 2, 33, HEAD_DIM, generator=gen) * 3.0  # other batch and length than at export
    x[0, 0, 0] = 0.0  # a zero vector: norm 0, codes of 0
    codes, norms, recon = _run(path, {"x": x})
    ref_codes, ref_norms = quantize(x, state.rotation, state.mean, state.scale, state.levels, bits, group)

    assert codes.dtype == torch.uint8 and codes.shape == ref_codes.shape
    mismatch = (unpack(codes, bits, HEAD_DIM) != unpack(ref_codes, bits, HEAD_DIM)).float().mean().item()
    assert mismatch <= MAX_CODE_MISMATCH, f"{mismatch:.2e} of codes differ from the reference"
    assert norms.dtype == torch.float16
    torch.testing.assert_close(norms.float(), ref_norms.float(), rtol=2e-3, atol=0)  # at most a tie's fp16 ulp
    assert (norms == ref_norms).float().mean() >= 0.99
    # Dequantize on the same codes: the ONNX read path equals the reference read path.
    expected = dequantize(codes, norms, state.rotation, state.mean, state.scale, state.levels, bits, HEAD_DIM, dtype)
    assert recon.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(recon.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("flavour,bits,search", [("standard", 3, True), ("tensorrt", 4, True), ("standard", 2, False)])
def test_quantize_codes_exact_ties_as_the_reference(tmp_path, flavour, bits, search):
    """The format's tie rule (a unit exactly on a boundary rounds toward zero) in the exported encoder: on input whose
    units sit on every decision boundary, the ONNX codes are the reference's bit for bit (no tie budget here), and the
    input holds ties that the rule before session 35 (`u > b` on both sides of 0) codes otherwise."""
    rotation, mean, scale, levels = ties.tie_params(bits, heads=2, dim=HEAD_DIM, group=HEAD_DIM, search=search)
    state = QuantState(rotation, mean, scale, levels, bits, HEAD_DIM)
    module = QuantizeDequantize(state).eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("tokens")}
    path = _export(module, (torch.randn(2, 2, 5, HEAD_DIM),), tmp_path / "qd.onnx", flavour, (dims,))
    x = ties.tie_input(bits, tokens=6, heads=2, dim=HEAD_DIM, group=HEAD_DIM)
    x = torch.cat([x, -x])
    codes, norms, _ = _run(path, {"x": x})
    ref_codes, ref_norms = quantize(x, rotation, mean, scale, levels, bits, HEAD_DIM)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(norms, ref_norms, rtol=0, atol=0)
    unit = x / x.norm(dim=-1, keepdim=True)
    nl = 2**bits
    strict = ties.strict_codes(unit, levels[:nl])
    assert not torch.equal(unpack(ref_codes, bits, HEAD_DIM), strict)


@pytest.mark.parametrize(
    "flavour,mask_kind,k_bits,v_bits,backend",
    [
        ("standard", "bool", 4, 2, "iso"),
        ("tensorrt", "bool", 3, 3, "planar"),
        ("tensorrt", "float", 2, 4, "rotor"),
        ("standard", "none", 3, 2, "hadamard"),
    ],
)
def test_attention_matches_the_reference(tmp_path, flavour, mask_kind, k_bits, v_bits, backend):
    gen = torch.Generator().manual_seed(k_bits * 10 + v_bits)
    config = RQConfig(backend=backend, key_bits=k_bits, value_bits=v_bits, norm_group=32)
    make = lambda kind: _calibrated(make_state(config, layer_idx=0, kind=kind, num_heads=2, head_dim=HEAD_DIM), gen)
    k, v = make("k"), make("v")
    k = replace(k, mean=torch.zeros_like(k.mean))  # rq::attention takes no key mean (softmax ignores it)
    module = CompressedAttention(k, v).eval()

    def inputs(batch: int, q_len: int, k_len: int) -> dict[str, torch.Tensor]:
        keys = torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen)
        values = torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen)
        k_codes, k_norms = quantize(keys, k.rotation, k.mean, k.scale, k.levels, k.bits, k.group)
        v_codes, v_norms = quantize(values, v.rotation, v.mean, v.scale, v.levels, v.bits, v.group)
        out = {"q": torch.randn(batch, 4, q_len, HEAD_DIM, generator=gen)}  # GQA: 4 query heads on 2 KV heads
        out.update(k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms)
        if mask_kind == "bool":
            mask = torch.rand(batch, 1, q_len, k_len, generator=gen) > 0.3
            mask[0, 0, 0] = False  # a fully masked row attends to nothing (output = v_mean)
            out["mask"] = mask
        elif mask_kind == "float":
            out["mask"] = torch.randn(batch, 1, q_len, k_len, generator=gen)
        return out

    names = ["q", "k_codes", "k_norms", "v_codes", "v_norms"] + ([] if mask_kind == "none" else ["mask"])
    batch, q_len, k_len = torch.export.Dim("batch"), torch.export.Dim("q_len"), torch.export.Dim("k_len")
    shapes = (
        [{0: batch, 2: q_len}]
        + [{0: batch, 2: k_len}] * 4
        + ([] if mask_kind == "none" else [{0: batch, 2: q_len, 3: k_len}])
    )
    example = inputs(2, 3, 7)
    path = _export(module, tuple(example[n] for n in names), tmp_path / "attn.onnx", flavour, tuple(shapes))

    test = inputs(3, 5, 19)
    (out,) = _run(path, test)
    expected = rotated_attention(
        test["q"], test["k_codes"], test["k_norms"], test["v_codes"], test["v_norms"], k, v, test.get("mask"), 0.125
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# -- calibrated bit allocation: mixed widths in 8-aligned runs, per-head channel order (perm) ------------------------


def _allocated(config: RQConfig, kind: str, spread: float, gen: torch.Generator) -> QuantState:
    """A calibrated-allocation state: strongly uneven channel weights, so the runs mix many widths."""
    weight = torch.exp(torch.randn(2, HEAD_DIM, generator=gen) * spread)
    state = make_state(config, layer_idx=0, kind=kind, num_heads=2, head_dim=HEAD_DIM, weight=weight)
    assert not state.uniform and state.perm is not None
    return _calibrated(state, gen)


ALLOCATION = (1, 2, 3, 4, 5, 6, 7, 8)


@pytest.mark.parametrize(
    "flavour,backend,spread,search",
    [
        ("standard", "planar", 3.0, False),  # widths 1, 3, 4, 6
        ("standard", "rotor", 4.0, True),  # widths 2, 3, 7 (padded rotor blocks)
        ("tensorrt", "iso", 3.0, True),
        ("tensorrt", "planar", 4.0, False),  # widths 1, 2, 4, 7
    ],
)
def test_bit_allocation_quantize_dequantize_match_the_reference(tmp_path, flavour, backend, spread, search):
    gen = torch.Generator().manual_seed(11)
    config = RQConfig(
        backend=backend, bits=3.5, bit_allocation=ALLOCATION, norm_group=32, scale_search=SCALE_SEARCH if search else ()
    )
    state = _allocated(config, "k", spread, gen)
    assert len(set(state.widths)) >= 3
    module = QuantizeDequantize(state).eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("tokens")}
    path = _export(module, (torch.randn(2, 2, 5, HEAD_DIM),), tmp_path / "qd.onnx", flavour, (dims,))
    if flavour == "tensorrt":
        assert check_tensorrt(path).ok, check_tensorrt(path).format()

    x = torch.randn(3, 2, 33, HEAD_DIM, generator=gen) * 3.0
    x[0, 0, 0] = 0.0
    codes, norms, recon = _run(path, {"x": x})
    s = state
    ref_codes, ref_norms = quantize(x, s.rotation, s.mean, s.scale, s.levels, s.widths, s.group, s.perm)
    assert codes.dtype == torch.uint8 and codes.shape == ref_codes.shape == (3, 2, 33, s.code_bytes)
    mismatch = (unpack(codes, s.widths, HEAD_DIM) != unpack(ref_codes, s.widths, HEAD_DIM)).float().mean().item()
    assert mismatch <= MAX_CODE_MISMATCH, f"{mismatch:.2e} of codes differ from the reference"
    torch.testing.assert_close(norms.float(), ref_norms.float(), rtol=2e-3, atol=0)
    expected = dequantize(codes, norms, s.rotation, s.mean, s.scale, s.levels, s.widths, HEAD_DIM, perm=s.perm)
    torch.testing.assert_close(recon, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (recon - x).abs().mean() < 0.5 * x.abs().mean()  # the perm is undone (1-bit coordinates are coarse)


@pytest.mark.parametrize("flavour,k_spread,v_spread", [("standard", 3.0, 2.0), ("tensorrt", 4.0, 0.0)])
def test_bit_allocation_attention_matches_the_reference(tmp_path, flavour, k_spread, v_spread):
    """Mixed-width keys with a perm; values either mixed too or uniform (`v_spread=0`: one plain 3-bit state)."""
    gen = torch.Generator().manual_seed(12)
    config = RQConfig(backend="iso", key_bits=3.5, value_bits=3, bit_allocation=ALLOCATION, norm_group=32)
    k = replace(_allocated(config, "k", k_spread, gen), mean=torch.zeros(2, HEAD_DIM))
    if v_spread:
        v = _allocated(config, "v", v_spread, gen)
    else:
        v = _calibrated(
            make_state(config.replace(key_bits=3, bit_allocation=()), layer_idx=0, kind="v", num_heads=2, head_dim=64),
            gen,
        )
    module = CompressedAttention(k, v).eval()

    def inputs(batch: int, q_len: int, k_len: int) -> dict[str, torch.Tensor]:
        keys = torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen)
        values = torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen)
        k_codes, k_norms = quantize(keys, k.rotation, k.mean, k.scale, k.levels, k.widths, k.group, k.perm)
        v_codes, v_norms = quantize(values, v.rotation, v.mean, v.scale, v.levels, v.widths, v.group, v.perm)
        mask = torch.rand(batch, 1, q_len, k_len, generator=gen) > 0.3
        return dict(
            q=torch.randn(batch, 4, q_len, HEAD_DIM, generator=gen),
            k_codes=k_codes,
            k_norms=k_norms,
            v_codes=v_codes,
            v_norms=v_norms,
            mask=mask,
        )

    names = ["q", "k_codes", "k_norms", "v_codes", "v_norms", "mask"]
    batch, q_len, k_len = torch.export.Dim("batch"), torch.export.Dim("q_len"), torch.export.Dim("k_len")
    shapes = [{0: batch, 2: q_len}] + [{0: batch, 2: k_len}] * 4 + [{0: batch, 2: q_len, 3: k_len}]
    example = inputs(2, 3, 7)
    path = _export(module, tuple(example[n] for n in names), tmp_path / "attn.onnx", flavour, tuple(shapes))
    if flavour == "tensorrt":
        assert check_tensorrt(path).ok, check_tensorrt(path).format()

    test = inputs(3, 5, 19)
    (out,) = _run(path, test)
    expected = rotated_attention(
        test["q"], test["k_codes"], test["k_norms"], test["v_codes"], test["v_norms"], k, v, test["mask"], 0.125
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# -- rq::attention_lse: rq::attention's output and each row's log-sum-exp ---------------------------------------------


class CompressedAttentionLSE(CompressedAttention):
    """rq::attention_lse over packed K/V inputs."""

    def forward(self, q, k_codes, k_norms, v_codes, v_norms, mask=None):
        args = (q, k_codes, k_norms, v_codes, v_norms, self.k_rotation, self.k_scale, self.k_levels, self.v_rotation)
        args += (self.v_mean, self.v_scale, self.v_levels, self.k_bits, self.v_bits, mask, self.sm_scale)
        return torch.ops.rq.attention_lse(*args, *self.layout())


def _attention_states(layout: bool, gen: torch.Generator):
    """K and V states for the attention tests: a calibrated bit allocation's layout (K 3.5, V 3 bits), or uniform
    planar K3 V2; K's mean zero (rq::attention takes none: softmax ignores it)."""
    if layout:
        config = RQConfig(backend="iso", key_bits=3.5, value_bits=3, bit_allocation=ALLOCATION, norm_group=32)
        k, v = _allocated(config, "k", 3.0, gen), _allocated(config, "v", 2.0, gen)
    else:
        config = RQConfig(backend="planar", key_bits=3, value_bits=2, norm_group=32)
        k, v = (_calibrated(make_state(config, layer_idx=0, kind=x, num_heads=2, head_dim=HEAD_DIM), gen) for x in "kv")
    return replace(k, mean=torch.zeros(2, HEAD_DIM)), v


@pytest.mark.parametrize("flavour,layout", [("standard", False), ("tensorrt", False), ("standard", True)])
def test_attention_lse_matches_the_reference(tmp_path, flavour, layout):
    """A fully masked row gives lse -inf (and V's mean), as the reference; the rest within float tolerance."""
    gen = torch.Generator().manual_seed(13)
    k, v = _attention_states(layout, gen)
    module = CompressedAttentionLSE(k, v).eval()

    def inputs(batch: int, q_len: int, k_len: int) -> dict[str, torch.Tensor]:
        k_codes, k_norms = quantize_state(torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen), k)
        v_codes, v_norms = quantize_state(torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen), v)
        mask = torch.rand(batch, 1, q_len, k_len, generator=gen) > 0.3
        mask[0, 0, 0] = False
        q = torch.randn(batch, 4, q_len, HEAD_DIM, generator=gen)
        return dict(q=q, k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms, mask=mask)

    names = ["q", "k_codes", "k_norms", "v_codes", "v_norms", "mask"]
    batch, q_len, k_len = torch.export.Dim("batch"), torch.export.Dim("q_len"), torch.export.Dim("k_len")
    shapes = [{0: batch, 2: q_len}] + [{0: batch, 2: k_len}] * 4 + [{0: batch, 2: q_len, 3: k_len}]
    example = inputs(2, 3, 7)
    path = _export(module, tuple(example[n] for n in names), tmp_path / "lse.onnx", flavour, tuple(shapes))
    if flavour == "tensorrt":
        assert check_tensorrt(path).ok, check_tensorrt(path).format()

    test = inputs(3, 5, 19)
    out, lse = _run(path, test)
    ref_out, ref_lse = module(*(test[n] for n in names))
    assert (lse[0, :, 0] == float("-inf")).all() and torch.isfinite(lse[1:]).all()
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * ref_out.abs().max().item())


class KeyRangeAttentionLSE(CompressedAttention):
    """rq::attention_lse over the keys kv_start <= j < kv_len[b], no mask: what a decode step passes since
    passes.decode_key_range."""

    kv_start = 2

    def forward(self, q, k_codes, k_norms, v_codes, v_norms, kv_len):
        args = (q, k_codes, k_norms, v_codes, v_norms, self.k_rotation, self.k_scale, self.k_levels, self.v_rotation)
        args += (self.v_mean, self.v_scale, self.v_levels, self.k_bits, self.v_bits, None, self.sm_scale, kv_len)
        return torch.ops.rq.attention_lse(*args, kv_start=self.kv_start)


@pytest.mark.parametrize("flavour", ["standard", "tensorrt"])
def test_attention_over_a_key_range_matches_the_reference(tmp_path, flavour):
    """kv_len and kv_start are the whole mask when there is none (the translation used to ignore kv_len): keys outside
    [kv_start, kv_len[b]) get no weight; a row whose range is empty gives lse -inf and V's mean."""
    gen = torch.Generator().manual_seed(14)
    k, v = _attention_states(False, gen)
    module = KeyRangeAttentionLSE(k, v).eval()

    def inputs(batch: int, k_len: int) -> dict[str, torch.Tensor]:
        k_codes, k_norms = quantize_state(torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen), k)
        v_codes, v_norms = quantize_state(torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen), v)
        kv_len = torch.randint(module.kv_start + 1, k_len + 1, (batch,), generator=gen, dtype=torch.int32)
        kv_len[0] = module.kv_start - 1  # nothing to read yet
        q = torch.randn(batch, 4, 1, HEAD_DIM, generator=gen)
        return dict(q=q, k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms, kv_len=kv_len)

    names = ["q", "k_codes", "k_norms", "v_codes", "v_norms", "kv_len"]
    batch, k_len = torch.export.Dim("batch"), torch.export.Dim("k_len")
    shapes = [{0: batch}] + [{0: batch, 2: k_len}] * 4 + [{0: batch}]
    example = inputs(2, 9)
    path = _export(module, tuple(example[n] for n in names), tmp_path / "range.onnx", flavour, tuple(shapes))
    if flavour == "tensorrt":
        assert check_tensorrt(path).ok, check_tensorrt(path).format()

    test = inputs(3, 23)
    out, lse = _run(path, test)
    ref_out, ref_lse = module(*(test[n] for n in names))
    masked = torch.arange(23) >= module.kv_start
    masked = (masked & (torch.arange(23) < test["kv_len"][:, None].long()))[:, None, None, :]
    plain = CompressedAttentionLSE(k, v).eval()(*(test[n] for n in names[:5]), masked)  # the same as a bool mask
    torch.testing.assert_close(ref_lse, plain[1])
    torch.testing.assert_close(ref_out, plain[0])
    assert (lse[0] == float("-inf")).all() and torch.isfinite(lse[1:]).all()
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * ref_out.abs().max().item())


# -- rq::attention(_lse)'s rope_ab / rope_inv_freq: a score term turning with the key's cache slot --------------------


class CompressedAttentionRope(CompressedAttention):
    """rq::attention (`with_lse`: rq::attention_lse) with the trailing rope_ab (a graph input) and rope_inv_freq (a
    buffer, as a model carries it); kv_len and, for uniform states, the layout arguments are None."""

    def __init__(self, k: QuantState, v: QuantState, inv_freq: torch.Tensor, with_lse: bool) -> None:
        super().__init__(k, v)
        self.register_buffer("rope_inv_freq", inv_freq)
        self.op = torch.ops.rq.attention_lse if with_lse else torch.ops.rq.attention

    def args(self, q, k_codes, k_norms, v_codes, v_norms, mask, rope_ab) -> tuple:
        args = (q, k_codes, k_norms, v_codes, v_norms, self.k_rotation, self.k_scale, self.k_levels, self.v_rotation)
        args += (self.v_mean, self.v_scale, self.v_levels, self.k_bits, self.v_bits, mask, self.sm_scale)
        layout = self.layout() or (None,) * 5
        return (*args, *layout, rope_ab, self.rope_inv_freq)

    def forward(self, q, k_codes, k_norms, v_codes, v_norms, mask, rope_ab):
        return self.op(*self.args(q, k_codes, k_norms, v_codes, v_norms, mask, rope_ab))


def _rope_weights(q: torch.Tensor, base: torch.Tensor, half: int) -> torch.Tensor:
    """rope_ab [B, Hq, Tq, 2 half] with q . RoPE_j(m) = sum_i A_i cos(j theta_i) + B_i sin(j theta_i) for the
    pre-RoPE key offset m = `base` [H, d] (rotate-half pairs i, i + half;
    GQA: query head h reads KV head h // rep)."""
    m = base.repeat_interleave(q.shape[1] // base.shape[0], dim=0)[None, :, None, :]
    q1, q2, m1, m2 = q[..., :half], q[..., half : 2 * half], m[..., :half], m[..., half : 2 * half]
    return torch.cat([q1 * m1 + q2 * m2, q2 * m1 - q1 * m2], dim=-1)


@pytest.mark.parametrize(
    "flavour,with_lse,mask_kind,half,layout",
    [
        ("standard", False, "bool", 32, False),
        ("tensorrt", False, "float", 16, False),  # partial rotary: 2h = 32 of 64 coordinates
        ("standard", True, "bool", 16, True),  # with a calibrated bit allocation's layout
        ("tensorrt", True, "bool", 32, False),
    ],
)
def test_attention_with_rope_term_matches_the_reference(tmp_path, flavour, with_lse, mask_kind, half, layout):
    """GQA with a mask, rope_ab of a pre-RoPE key offset (`_rope_weights`), against
    `rqcompile.ops.reference_attention(_lse)`; the cache length at run time differs from the export's."""
    gen = torch.Generator().manual_seed(14 + half)
    k, v = _attention_states(layout, gen)
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
    base = torch.randn(2, HEAD_DIM, generator=gen) * 2.0  # the pre-RoPE key offset m, one per KV head
    module = CompressedAttentionRope(k, v, inv_freq, with_lse).eval()

    def inputs(batch: int, q_len: int, k_len: int) -> dict[str, torch.Tensor]:
        k_codes, k_norms = quantize_state(torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen), k)
        v_codes, v_norms = quantize_state(torch.randn(batch, 2, k_len, HEAD_DIM, generator=gen), v)
        q = torch.randn(batch, 4, q_len, HEAD_DIM, generator=gen)  # GQA: 4 query heads on 2 KV heads
        if mask_kind == "bool":
            mask = torch.rand(batch, 1, q_len, k_len, generator=gen) > 0.3
            mask[0, 0, 0] = False  # a fully masked row: V's mean (and lse -inf), the term notwithstanding
        else:
            mask = torch.randn(batch, 1, q_len, k_len, generator=gen)
        rope_ab = _rope_weights(q, base, half)
        return dict(q=q, k_codes=k_codes, k_norms=k_norms, v_codes=v_codes, v_norms=v_norms, mask=mask, rope_ab=rope_ab)

    names = ["q", "k_codes", "k_norms", "v_codes", "v_norms", "mask", "rope_ab"]
    batch, q_len, k_len = torch.export.Dim("batch"), torch.export.Dim("q_len"), torch.export.Dim("k_len")
    shapes = (
        [{0: batch, 2: q_len}] + [{0: batch, 2: k_len}] * 4 + [{0: batch, 2: q_len, 3: k_len}, {0: batch, 2: q_len}]
    )
    example = inputs(2, 3, 7)
    path = _export(module, tuple(example[n] for n in names), tmp_path / "rope.onnx", flavour, tuple(shapes))
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Cos", "Sin", "Range"} <= op_types
    if flavour == "tensorrt":
        assert check_tensorrt(path).ok, check_tensorrt(path).format()

    test = inputs(3, 5, 40)  # slots up to 39: angles up to 39 rad on the fastest frequency
    outs = _run(path, test)
    args = module.args(*(test[n] for n in names))
    if with_lse:
        ref_out, ref_lse = ops.reference_attention_lse(*args)
        out, lse = outs
        if mask_kind == "bool":
            assert (lse[0, :, 0] == float("-inf")).all() and torch.isfinite(lse[1:]).all()
        torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
        plain = ops.reference_attention_lse(*args[:-2])[1]
        assert (plain - ref_lse)[torch.isfinite(ref_lse)].abs().max() > 0.1  # the term matters here
    else:
        ref_out = ops.reference_attention(*args)
        (out,) = outs
        plain = ops.reference_attention(*args[:-2])
        assert (plain - ref_out).abs().max() > 0.1 * ref_out.abs().max()  # the term matters here
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * ref_out.abs().max().item())


def test_attention_without_rope_has_no_rope_ops(tmp_path):
    """No rope_ab / rope_inv_freq: no trace of the term in the graph (rq::attention_lse, the TensorRT flavour)."""
    config = RQConfig(backend="planar", key_bits=3, value_bits=2, norm_group=32)
    k, v = (make_state(config, layer_idx=0, kind=x, num_heads=2, head_dim=HEAD_DIM) for x in "kv")
    module = CompressedAttentionLSE(replace(k, mean=torch.zeros(2, HEAD_DIM)), v).eval()
    k_codes, k_norms = quantize_state(torch.randn(1, 2, 6, HEAD_DIM), k)
    v_codes, v_norms = quantize_state(torch.randn(1, 2, 6, HEAD_DIM), v)
    args = (torch.randn(1, 4, 2, HEAD_DIM), k_codes, k_norms, v_codes, v_norms)
    path = _export(module, args, tmp_path / "plain.onnx", "tensorrt", None)
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not {"Cos", "Sin", "Range"} & op_types
