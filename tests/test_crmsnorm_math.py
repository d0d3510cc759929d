"""float64 unit tests of Pre-CRMSNorm (docs/math.md "Pre-CRMSNorm: lossless compression to d−1").

Every tensor here is created with an explicit dtype: another test module changes torch's default.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prenorm_convert import transform as T
from prenorm_convert.modeling import NORM_KINDS, PrenormCRMSNorm, restore_full_width

F64 = torch.float64
EPS = 1e-5
dims = st.integers(min_value=2, max_value=33)
seeds = st.integers(0, 10_000)


def randn(*shape, generator, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=generator, dtype=F64) * scale + shift


def zero_mean_stream(rows, d, generator):
    """A residual stream as the converted model carries it: every row zero-mean, large and varied."""
    return T.center_rows(randn(rows, d, generator=generator, scale=5.0, shift=3.0))


def rms_norm(x, eps=EPS):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), None, eps)


def layer_norm(x, gamma, beta, eps=EPS):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def crms(x_tilde, eps=EPS):
    return PrenormCRMSNorm(x_tilde.shape[-1], eps)(x_tilde)


@settings(max_examples=50, deadline=None)
@given(d=dims, seed=seeds, eps=st.sampled_from([1e-5, 1e-6, 1e-2]))
def test_crmsnorm_is_the_first_d_minus_1_of_rmsnorm_on_a_zero_mean_input(d, seed, eps):
    x = zero_mean_stream(7, d, torch.Generator().manual_seed(seed))
    expected = rms_norm(x, eps)[:, :-1]
    assert torch.allclose(crms(x[:, :-1], eps), expected, rtol=1e-12, atol=1e-14)


def test_crmsnorm_is_registered_and_has_no_affine():
    assert NORM_KINDS["crmsnorm"] is PrenormCRMSNorm
    norm = NORM_KINDS["crmsnorm"](63, 1e-5, affine=False, bias=False)
    assert list(norm.parameters()) == [] and "63" in repr(norm) and "64" in repr(norm)
    with pytest.raises(ValueError, match="fold"):
        PrenormCRMSNorm(63, 1e-5, affine=True)


@settings(max_examples=30, deadline=None)
@given(d=dims, seed=seeds)
def test_restore_full_width_recovers_the_dropped_feature(d, seed):
    x = zero_mean_stream(4, d, torch.Generator().manual_seed(seed))
    assert torch.allclose(restore_full_width(x[:, :-1]), x, atol=1e-12)
    # the CRMSNorm output is the first d-1 of a zero-mean vector too
    assert torch.allclose(restore_full_width(crms(x[:, :-1])), rms_norm(x), atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(d=dims, out=st.integers(1, 9), seed=seeds, layout=st.sampled_from(["linear", "conv1d"]))
def test_merge_last_input_reads_the_compressed_stream_exactly(d, out, seed, layout):
    g = torch.Generator().manual_seed(seed)
    x = zero_mean_stream(6, d, g)
    weight = randn(out, d, generator=g) if layout == "linear" else randn(d, out, generator=g)
    merged = T.merge_last_input(weight, layout=layout)
    full = x @ weight.T if layout == "linear" else x @ weight
    compressed = x[:, :-1] @ merged.T if layout == "linear" else x[:, :-1] @ merged
    assert merged.shape == ((out, d - 1) if layout == "linear" else (d - 1, out))
    assert torch.allclose(compressed, full, rtol=1e-12, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(d=dims, inner=st.integers(1, 9), seed=seeds, layout=st.sampled_from(["linear", "conv1d"]))
def test_centered_writer_without_its_last_output_writes_the_compressed_stream(d, inner, seed, layout):
    g = torch.Generator().manual_seed(seed)
    h = randn(5, inner, generator=g)
    weight = randn(d, inner, generator=g) if layout == "linear" else randn(inner, d, generator=g)
    bias = randn(d, generator=g, shift=1.0)
    centered_w, centered_b = T.center_writer_weight(weight, layout=layout), T.center_vector(bias)
    w, b = T.drop_last_output(centered_w, layout=layout), T.drop_last_feature(centered_b)
    full = (h @ centered_w.T if layout == "linear" else h @ centered_w) + centered_b
    compressed = (h @ w.T if layout == "linear" else h @ w) + b
    assert compressed.shape[-1] == d - 1
    assert torch.allclose(restore_full_width(compressed), full, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(d=dims, out=st.integers(1, 9), seed=seeds, layout=st.sampled_from(["linear", "conv1d"]))
def test_layernorm_then_reader_equals_crmsnorm_then_folded_merged_reader(d, out, seed, layout):
    """One norm + reader of the original model against its crmsnorm rewrite, on any (not centered) x."""
    g = torch.Generator().manual_seed(seed)
    x = randn(6, d, generator=g, scale=4.0, shift=2.0)
    gamma, beta = randn(d, generator=g, shift=1.0), randn(d, generator=g)
    weight = randn(out, d, generator=g) if layout == "linear" else randn(d, out, generator=g)
    bias = randn(out, generator=g)

    def read(n, w, b):
        return (n @ w.T if layout == "linear" else n @ w) + b

    original = read(layer_norm(x, gamma, beta), weight, bias)
    folded_bias = T.fold_beta(weight, beta, layout=layout, bias=bias)
    merged = T.merge_last_input(T.fold_gamma(weight, gamma, layout=layout), layout=layout)
    compressed_stream = T.drop_last_feature(T.center_rows(x))
    converted = read(crms(compressed_stream), merged, folded_bias)
    assert torch.allclose(converted, original, rtol=1e-10, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(d=dims, seed=seeds)
def test_embedding_compression_round_trip(d, seed):
    table = randn(11, d, generator=torch.Generator().manual_seed(seed), shift=0.7)
    compressed = T.drop_last_feature(T.center_rows(table))
    assert compressed.shape == (11, d - 1)
    assert torch.allclose(restore_full_width(compressed), T.center_rows(table), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_forward_is_accurate_to_the_output_rounding(dtype):
    """Sums run in float32: the only error left is rounding the input and the output to the dtype."""
    g = torch.Generator().manual_seed(0)
    d = 769  # odd, awkward width like GPT-2 small's 768 - 1 ... + 2
    x = zero_mean_stream(64, d, g)[:, :-1].to(dtype)  # what a reduced-precision stream holds
    reference = crms(x.to(F64))
    result = crms(x)
    assert result.dtype == dtype
    ulp = torch.finfo(dtype).eps  # relative spacing at 1.0; outputs are O(1)
    error = (result.to(F64) - reference).abs() / reference.abs().clamp_min(1e-3)
    assert float(error.max()) <= ulp, float(error.max())


@settings(max_examples=30, deadline=None)
@given(d=dims, extra=st.integers(1, 9), seed=seeds, layout=st.sampled_from(["linear", "conv1d"]))
def test_zero_padded_stream_computes_the_same_function(d, extra, seed, layout):
    """--pad-to: embeddings/writers gain zero features, readers zero input columns; CRMSNorm ignores zeros."""
    g = torch.Generator().manual_seed(seed)
    width = d - 1 + extra
    x = zero_mean_stream(5, d, g)
    x_tilde = x[:, :-1]
    padded = T.zero_pad_feature(x_tilde, width=width)
    assert padded.shape[-1] == width and not padded[:, d - 1:].any()
    norm = PrenormCRMSNorm(d - 1, EPS)
    normed = norm(padded)
    assert torch.allclose(normed[:, : d - 1], norm(x_tilde), rtol=1e-14, atol=0) and not normed[:, d - 1:].any()
    reader = randn(4, d, generator=g) if layout == "linear" else randn(d, 4, generator=g)
    merged = T.merge_last_input(reader, layout=layout)
    padded_reader = T.zero_pad_input(merged, layout=layout, width=width)
    read = (lambda n, w: n @ w.T) if layout == "linear" else (lambda n, w: n @ w)
    assert torch.allclose(read(normed, padded_reader), read(norm(x_tilde), merged), rtol=1e-12, atol=1e-12)
    writer = randn(d - 1, 3, generator=g) if layout == "linear" else randn(3, d - 1, generator=g)  # [out, in] / [in, out]
    padded_writer = T.zero_pad_output(writer, layout=layout, width=width)
    h = randn(2, 3, generator=g)
    written = read(h, padded_writer)
    assert written.shape[-1] == width and not written[:, d - 1:].any()
    assert torch.allclose(restore_full_width(padded, residual_width=d - 1), x, atol=1e-12)


def test_crmsnorm_gradient_is_correct():
    """The forward works in place on its own temporaries only: training through it is exact."""
    x = zero_mean_stream(3, 6, torch.Generator().manual_seed(0))[:, :-1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: PrenormCRMSNorm(5, EPS)(t), (x,))
