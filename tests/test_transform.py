"""float64 unit tests of the pure rewrites (docs/math.md)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prenorm_convert import transform as T



@pytest.fixture(autouse=True)
def float64_by_default():
    """Pure math runs in float64; restore the default so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def layer_norm(x, gamma, beta, eps=1e-5):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def rms_norm(x, gamma, beta, eps=1e-5):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), gamma, eps) + beta


def conv1d(x, weight, bias):  # transformers Conv1D: weight [in, out]
    return x @ weight + bias


def linear(x, weight, bias):
    return x @ weight.T + bias


dims = st.integers(min_value=2, max_value=17)


@settings(max_examples=40, deadline=None)
@given(d=dims, seed=st.integers(0, 10_000))
def test_layernorm_equals_rmsnorm_on_centered_input(d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, d, generator=g) * 3 + 7
    gamma, beta = torch.randn(d, generator=g), torch.randn(d, generator=g)
    centered = T.center_rows(x)
    assert torch.allclose(centered.mean(-1), torch.zeros(5), atol=1e-12)
    assert torch.allclose(layer_norm(x, gamma, beta), rms_norm(centered, gamma, beta), atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(d=dims, inner=dims, seed=st.integers(0, 10_000))
def test_centered_writer_output_is_zero_mean_and_reads_the_same(d, inner, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, inner, generator=g)
    w_lin, b = torch.randn(d, inner, generator=g), torch.randn(d, generator=g)
    y = linear(h, T.center_writer_weight(w_lin, "linear"), T.center_vector(b))
    assert torch.allclose(y.mean(-1), torch.zeros(4), atol=1e-10)
    # the centered output is the original output minus its mean: every LN downstream sees the same thing
    original = linear(h, w_lin, b)
    assert torch.allclose(y, original - original.mean(-1, keepdim=True), atol=1e-10)
    w_conv = w_lin.T.contiguous()
    y_conv = conv1d(h, T.center_writer_weight(w_conv, "conv1d"), T.center_vector(b))
    assert torch.allclose(y_conv, y, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(d=dims, out=dims, seed=st.integers(0, 10_000), with_bias=st.booleans())
def test_folding_gamma_beta_into_reader_is_exact(d, out, seed, with_bias):
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(6, d, generator=g)
    gamma, beta = torch.randn(d, generator=g), torch.randn(d, generator=g)
    weight = torch.randn(out, d, generator=g)
    bias = torch.randn(out, generator=g) if with_bias else None
    expected = linear(gamma * n + beta, weight, bias if bias is not None else torch.zeros(out))
    folded = linear(n, T.fold_gamma(weight, gamma, "linear"), T.fold_beta(weight, beta, "linear", bias))
    assert torch.allclose(folded, expected, atol=1e-10)
    w_conv = weight.T.contiguous()
    folded_conv = conv1d(n, T.fold_gamma(w_conv, gamma, "conv1d"), T.fold_beta(w_conv, beta, "conv1d", bias))
    assert torch.allclose(folded_conv, expected, atol=1e-10)


def test_bake_layernorm_then_center_gives_zero_mean_rows():
    g = torch.Generator().manual_seed(0)
    table, gamma, beta = torch.randn(10, 8, generator=g) + 2, torch.randn(8, generator=g), torch.randn(8, generator=g)
    baked = T.center_rows(T.bake_layernorm(table, gamma, beta, 1e-5))
    assert torch.allclose(baked.mean(-1), torch.zeros(10), atol=1e-12)
    # any LayerNorm reading the baked table sees what it saw reading LN_emb(E)
    downstream = layer_norm(T.bake_layernorm(table, gamma, beta, 1e-5), torch.ones(8), torch.zeros(8))
    assert torch.allclose(layer_norm(baked, torch.ones(8), torch.zeros(8)), downstream, atol=1e-10)
