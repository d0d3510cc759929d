"""The fast RMSNorm path of the remote code (norm_functions.rms_norm) against the formula of docs/math.md.

RMSNorm(x) = γ ⊙ x / sqrt(mean(x²) + ε) + β, evaluated here in float64 as the reference. The
fast path must be that function for any input — including inputs that are not zero-mean, where
LayerNorm's kernel would give something else — to within the rounding of the dtype it runs in.
"""

from __future__ import annotations

import pytest
import torch

from prenorm_convert import norm_functions
from prenorm_convert.modeling import PrenormCRMSNorm, PrenormRMSNorm
from prenorm_convert.norm_functions import rms_norm

EPS = 1e-5


def reference(x, weight, bias, eps=EPS):
    x64 = x.double()
    out = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.double()
    if bias is not None:
        out = out + bias.double()
    return out


def inputs(dtype, shape=(3, 5, 48), seed=0, mean=2.0):
    generator = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=generator) * 3 + mean).to(dtype)  # far from zero-mean on purpose
    weight = (1 + 0.4 * torch.randn(d, generator=generator)).to(dtype)
    bias = (0.3 * torch.randn(d, generator=generator)).to(dtype)
    return x, weight, bias


AFFINE = [("weight+bias", True, True), ("weight", True, False), ("weightless", False, False)]


@pytest.mark.parametrize("label,use_weight,use_bias", AFFINE)
def test_float64_matches_formula(label, use_weight, use_bias):
    x, weight, bias = inputs(torch.float64)
    weight, bias = (weight if use_weight else None), (bias if use_bias else None)
    out = rms_norm(x, weight, bias, EPS)
    assert out.dtype == torch.float64
    assert torch.allclose(out, reference(x, weight, bias), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("label,use_weight,use_bias", AFFINE)
def test_float32_within_float32_rounding(label, use_weight, use_bias):
    x, weight, bias = inputs(torch.float32)
    weight, bias = (weight if use_weight else None), (bias if use_bias else None)
    out = rms_norm(x, weight, bias, EPS)
    expected = reference(x, weight, bias)
    assert out.dtype == torch.float32
    # a few float32 ulps of the terms that are summed, |x̂ γ| + |β|
    scaled = reference(x, weight, None).abs()
    bound = 8 * torch.finfo(torch.float32).eps * (scaled + (bias.double().abs() if bias is not None else 0))
    assert torch.all((out.double() - expected).abs() <= bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 5, 48), (8, 128, 96)])
def test_reduced_precision_rounds_once(dtype, shape):
    """Statistics, scale and γ, β in float32, then one rounding to the dtype, as LayerNorm's kernel
    does: |error| <= u |exact| (u the unit roundoff) plus float32's own error on the terms."""
    x, weight, bias = inputs(dtype, shape=shape)
    out = rms_norm(x, weight, bias, EPS)
    assert out.dtype == dtype
    scaled = reference(x, weight, None)
    expected = scaled + bias.double()
    unit_roundoff = torch.finfo(dtype).eps / 2
    bound = unit_roundoff * expected.abs() * 1.001 + 2**-20 * (scaled.abs() + bias.double().abs())
    assert torch.all((out.double() - expected).abs() <= bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_is_never_written(dtype):
    x, weight, bias = inputs(dtype)
    before = x.clone()
    for w, b in ((weight, bias), (weight, None), (None, bias), (None, None)):
        rms_norm(x, w, b, EPS)
    PrenormCRMSNorm(x.shape[-1], EPS)(x)
    assert torch.equal(x, before)


def test_it_is_rmsnorm_not_layernorm():
    """On a stream with a mean, RMSNorm and LayerNorm differ; on a centred one they agree (docs/math.md)."""
    x, weight, bias = inputs(torch.float64)
    layer_norm = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, EPS)
    assert (rms_norm(x, weight, bias, EPS) - layer_norm).abs().max() > 1e-2
    centred = x - x.mean(-1, keepdim=True)
    layer_norm = torch.nn.functional.layer_norm(centred, (x.shape[-1],), weight, bias, EPS)
    assert torch.allclose(rms_norm(centred, weight, bias, EPS), layer_norm, rtol=1e-12, atol=1e-12)


def test_non_contiguous_and_single_token_inputs():
    x, weight, bias = inputs(torch.float32, shape=(4, 6, 48))
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, last axis strided
    assert not strided.is_contiguous()
    assert torch.allclose(rms_norm(strided, weight, bias, EPS).double(), reference(strided, weight, bias), rtol=1e-5, atol=1e-5)
    one = x[:1, 0, :]
    assert torch.allclose(rms_norm(one, weight, bias, EPS).double(), reference(one, weight, bias), rtol=1e-5, atol=1e-5)


def test_gradients_match_formula():
    x, weight, bias = inputs(torch.float64, shape=(2, 3, 16))
    leaves = [tensor.clone().requires_grad_(True) for tensor in (x, weight, bias)]
    copies = [tensor.clone().requires_grad_(True) for tensor in (x, weight, bias)]
    grad = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rms_norm(leaves[0], leaves[1], leaves[2], EPS).backward(grad)
    reference(*copies).backward(grad)
    for fast, slow in zip(leaves, copies):
        assert torch.allclose(fast.grad, slow.grad, rtol=1e-12, atol=1e-12)


def test_module_keeps_its_parameters_and_uses_the_fast_path():
    module = PrenormRMSNorm(48, EPS).double()
    assert [name for name, _ in module.named_parameters()] == ["weight", "bias"]
    x, weight, bias = inputs(torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    assert torch.equal(module(x), rms_norm(x, weight, bias, EPS))
    weightless = PrenormRMSNorm(48, EPS, affine=False)
    assert list(weightless.parameters()) == []
    assert torch.equal(weightless(x.float()), rms_norm(x.float(), None, None, EPS))


def test_cached_epsilon_survives_fake_tensors_and_inference_mode():
    """ε is cached as a tensor per dtype; a first call under fake tensors (the planner's width check)
    or under inference_mode must not leave a cached tensor that breaks later real or autograd calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    norm_functions._EPSILONS.clear()
    x, weight, bias = inputs(torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = rms_norm(torch.empty(3, 5, 48), None, None, EPS)
    assert fake.shape == (3, 5, 48)
    with torch.inference_mode():
        rms_norm(x, weight, bias, EPS)
    leaf = x.clone().requires_grad_(True)
    rms_norm(leaf, weight, bias, EPS).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert torch.allclose(rms_norm(x, weight, bias, EPS).double(), reference(x, weight, bias), rtol=1e-5, atol=1e-5)
