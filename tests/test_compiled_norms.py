"""The compiled CPU norms of the remote code (opt-in, PRENORM_COMPILE=1) against the formula of
docs/math.md, with the bars tests/test_fast_norms.py sets for the eager path, and against the eager
path itself: norm_functions._rms_kernel and _crms_kernel, run as an AOTInductor package in inference
("infer") and through torch.compile while autograd records ("train").

Compiling costs seconds to a minute on this project's 2-core machine (docs/performance.md
"Compiled CPU norms"), so every test that compiles a kernel is marked slow (-m slow); the default
run keeps the kernels' formula in float64, the fallback, the switch and what stays eager. Every
test here lowers the size thresholds so that small inputs take the compiled path, and lets float32
take it in inference too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch
from test_fast_norms import AFFINE, EPS, inputs, reference

from prenorm_convert import norm_functions
from prenorm_convert.modeling import PrenormCRMSNorm
from prenorm_convert.norm_functions import rms_norm

COMPILED = (torch.bfloat16, torch.float16, torch.float32)
SLOW = pytest.mark.slow
REDUCED = [torch.bfloat16, pytest.param(torch.float16, marks=SLOW)]
AFFINE_FAST = [AFFINE[0]] + [pytest.param(*variant, marks=SLOW) for variant in AFFINE[1:]]
SHAPE = (4, 33, 96)


@pytest.fixture(autouse=True)
def compiled_path(monkeypatch):
    monkeypatch.setitem(norm_functions._COMPILE, "on", True)
    monkeypatch.setattr(norm_functions, "INFERENCE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(norm_functions, "COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(norm_functions, "COMPILED_DTYPES", COMPILED)


@pytest.fixture(scope="module")
def compiler_works():
    """Skip where no C++ compiler works (the fallback is tested below either way). It compiles the
    kernel the default run shares: RMSNorm with γ, β in bf16, forward and backward, every input
    requiring grad. The switch is left as the module found it."""
    before = norm_functions._COMPILE["on"]
    norm_functions._COMPILE["on"] = True
    leaves = [tensor.requires_grad_(True) for tensor in inputs(torch.bfloat16, shape=SHAPE)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norm_functions, "COMPILE_MIN_ELEMENTS", 1)
        rms_norm(*leaves, EPS).sum().backward()
    works = norm_functions._COMPILE["on"] and ("train", "_rms_kernel", torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32) in norm_functions._COMPILED
    norm_functions._COMPILE["on"] = before
    if not works:
        pytest.skip("compiling does not work here: the eager norms are used")
    yield
    norm_functions._COMPILE["on"] = before


def COMPILES(test):
    """A test that compiles a kernel: opt-in (-m slow), as the compiled norms are (a first compile
    takes 25-50 s on a machine with an empty inductor cache, more than the default run can give)."""
    return SLOW(pytest.mark.usefixtures("compiler_works")(test))


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def eager(function, *args):
    """The same call on the eager path."""
    on = norm_functions._COMPILE["on"]
    norm_functions._COMPILE["on"] = False
    try:
        return function(*args)
    finally:
        norm_functions._COMPILE["on"] = on


def crms(x):
    return PrenormCRMSNorm(x.shape[-1], EPS)(x)


def crms_reference(x):
    """CRMSNorm in float64: the first d-1 of RMSNorm of [x̃, -Σ x̃] (docs/math.md "Pre-CRMSNorm")."""
    x64 = x.double()
    return reference(torch.cat([x64, -x64.sum(-1, keepdim=True)], dim=-1), None, None)[..., :-1]


def assert_rounds_once(out, x, weight, bias):
    """One rounding of the exact result, plus float32's own error on the terms (as test_fast_norms)."""
    scaled = reference(x, weight, None)
    expected = scaled + (bias.double() if bias is not None else 0)
    unit_roundoff = torch.finfo(out.dtype).eps / 2
    bound = unit_roundoff * expected.abs() * 1.001 + 2**-20 * (scaled.abs() + (bias.double().abs() if bias is not None else 0))
    assert torch.all((out.double() - expected).abs() <= bound)


@SLOW
@COMPILES
@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("label,use_weight,use_bias", AFFINE_FAST)
def test_reduced_precision_rounds_once(dtype, label, use_weight, use_bias):
    x, weight, bias = inputs(dtype, shape=SHAPE)
    weight, bias = (weight if use_weight else None), (bias if use_bias else None)
    with torch.inference_mode():
        out = rms_norm(x, weight, bias, EPS)
    key = ("infer", "_rms_kernel", dtype, weight if weight is None else dtype, bias if bias is None else dtype, torch.float32)
    assert key in norm_functions._COMPILED and out.dtype == dtype
    assert_rounds_once(out, x, weight, bias)


@COMPILES
@SLOW
@pytest.mark.parametrize("label,use_weight,use_bias", AFFINE)
def test_float32_within_float32_rounding(label, use_weight, use_bias):
    x, weight, bias = inputs(torch.float32, shape=SHAPE)
    weight, bias = (weight if use_weight else None), (bias if use_bias else None)
    out = rms_norm(x, weight, bias, EPS)
    assert ("infer", "_rms_kernel", torch.float32) + (weight if weight is None else torch.float32,) in [key[:4] for key in norm_functions._COMPILED]
    scaled = reference(x, weight, None).abs()
    bound = 8 * torch.finfo(torch.float32).eps * (scaled + (bias.double().abs() if bias is not None else 0))
    assert torch.all((out.double() - reference(x, weight, bias)).abs() <= bound)


@SLOW
@COMPILES
@pytest.mark.parametrize("dtype", REDUCED + [pytest.param(torch.float32, marks=SLOW)])
def test_crmsnorm_is_accurate_to_the_output_rounding(dtype):
    x = inputs(dtype, shape=(4, 33, 95))[0]
    result, expected = crms(x), crms_reference(x)
    assert result.dtype == dtype and ("infer", "_crms_kernel", dtype, torch.float32, torch.float32) in norm_functions._COMPILED
    ulp = torch.finfo(dtype).eps
    assert torch.all((result.double() - expected).abs() <= ulp * expected.abs() + 2**-20)


@pytest.mark.parametrize("label,use_weight,use_bias", AFFINE)
def test_kernels_are_the_formula_in_float64(label, use_weight, use_bias):
    """The kernels the compilers take, run as plain torch in float64: the formula to 1e-13 (what the
    compilers then do to them is checked against the eager path below, in the dtypes they run in)."""
    x, weight, bias = inputs(torch.float64, shape=SHAPE)
    weight, bias = (weight if use_weight else None), (bias if use_bias else None)
    out = norm_functions._rms_kernel(x, weight, bias, norm_functions._epsilon(EPS, x))
    assert torch.allclose(out, reference(x, weight, bias), rtol=1e-13, atol=1e-13)
    crms_out = norm_functions._crms_kernel(x, norm_functions._epsilon(EPS, x), norm_functions._epsilon(1 / (SHAPE[-1] + 1), x))
    assert torch.allclose(crms_out, crms_reference(x), rtol=1e-13, atol=1e-13)


def assert_matches_eager(out, eager_out, terms):
    """Both paths compute in float32 (or wider) and round once. In float32, each is within 8 ulps
    of the terms summed, |x̂ γ| + |β|, of the formula (tests/test_fast_norms.py), so within 16 of
    each other. In bf16/fp16, their float32 values differ by at most 2^-20 of the terms (another
    summation order), and rounding both puts them at most one ulp of the dtype (eps |y|) further
    apart."""
    eps = torch.finfo(out.dtype).eps
    if out.dtype == torch.float32:
        tolerance = 16 * eps * terms
    else:
        tolerance = eps * eager_out.double().abs() + 2**-20 * terms
    assert out.dtype == eager_out.dtype and torch.all((out.double() - eager_out.double()).abs() <= tolerance)


@SLOW
@COMPILES
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=SLOW)])
def test_compiled_matches_the_eager_path(dtype):
    x, weight, bias = inputs(dtype, shape=SHAPE)
    terms = reference(x, weight, None).abs() + bias.double().abs()
    narrow = x[..., :95]
    with torch.inference_mode():
        assert_matches_eager(rms_norm(x, weight, bias, EPS), eager(rms_norm, x, weight, bias, EPS), terms)
        assert_matches_eager(crms(narrow), eager(crms, narrow), crms_reference(narrow).abs())
    assert ("infer", "_rms_kernel", dtype, dtype, dtype, torch.float32) in norm_functions._COMPILED


@SLOW
@COMPILES
def test_one_package_serves_every_batch_and_sequence_length():
    """Inference: one AOTInductor package per kernel, dtype and pattern, whatever the shape."""
    _, weight, bias = inputs(torch.bfloat16, shape=SHAPE)
    rms_norm(inputs(torch.bfloat16, shape=SHAPE)[0], weight, bias, EPS)
    packages = dict(norm_functions._COMPILED)
    with torch.inference_mode():
        for batch, seq in ((1, 2), (3, 17), (8, 128), (5, 1)):
            x = inputs(torch.bfloat16, shape=(batch, seq, 96), seed=batch)[0]
            assert_rounds_once(rms_norm(x, weight, bias, EPS), x, weight, bias)
    assert norm_functions._COMPILED == packages


@COMPILES
def test_no_recompiles_while_training_across_batch_and_sequence_lengths():
    """Training: torch.compile with dynamic shapes compiles the kernel once for every batch and
    sequence length (two rows or more; one row stays eager): no new graph, no recompile."""
    from torch._dynamo.utils import counters

    _, weight, bias = (tensor.requires_grad_(True) for tensor in inputs(torch.bfloat16, shape=SHAPE))
    before = (graphs(), sum(counters["recompiles"].values()))
    for batch, seq in ((1, 2), (3, 17), (8, 128), (5, 1), (1, 512)):
        x = inputs(torch.bfloat16, shape=(batch, seq, 96), seed=batch)[0].requires_grad_(True)
        rms_norm(x, weight, bias, EPS).sum().backward()
    assert (graphs(), sum(counters["recompiles"].values())) == before
    assert sum(key[:3] == ("train", "_rms_kernel", torch.bfloat16) for key in norm_functions._COMPILED) == 1


@SLOW
@COMPILES
def test_no_recompiles_for_crmsnorm():
    crms(inputs(torch.bfloat16, shape=(2, 7, 95))[0].requires_grad_(True)).sum().backward()
    before = graphs()
    for batch, seq in ((1, 2), (3, 17), (8, 128), (5, 1)):
        crms(inputs(torch.bfloat16, shape=(batch, seq, 95), seed=batch)[0].requires_grad_(True)).sum().backward()
    assert graphs() == before


@SLOW
@COMPILES
def test_input_is_never_written_and_output_is_fresh():
    x, weight, bias = inputs(torch.bfloat16, shape=SHAPE)
    before = x.clone()
    outputs = [rms_norm(x, weight, bias, EPS), crms(x)]
    assert torch.equal(x, before)
    assert all(out.data_ptr() != x.data_ptr() for out in outputs)


@SLOW
@COMPILES
def test_inputs_the_package_was_not_made_for_are_handled():
    """AOTInductor's code checks nothing: strided inputs are made contiguous, a weight of another
    width goes to the eager path (which refuses it), one of another dtype gets its own package."""
    x, weight, bias = inputs(torch.bfloat16, shape=SHAPE)
    strided_x = torch.stack([x, 2 * x], dim=-1)[..., 0]
    strided_weight = torch.stack([weight, bias], dim=-1)[:, 0]
    assert not strided_x.is_contiguous() and not strided_weight.is_contiguous()
    assert_rounds_once(rms_norm(strided_x, strided_weight, bias, EPS), x, weight, bias)
    with pytest.raises(RuntimeError):
        rms_norm(x, weight[:50], bias, EPS)
    assert norm_functions._COMPILE["on"]


@COMPILES
@SLOW
def test_weights_of_another_dtype_get_their_own_package():
    x, weight, bias = inputs(torch.bfloat16, shape=SHAPE)
    out = rms_norm(x, weight.float(), bias.float(), EPS)
    assert ("infer", "_rms_kernel", torch.bfloat16, torch.float32, torch.float32, torch.float32) in norm_functions._COMPILED
    assert_rounds_once(out, x, weight, bias)


@COMPILES
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=SLOW)])
def test_gradients_match_the_eager_path(dtype):
    """Training runs through torch.compile: its gradients are the eager path's, to within the
    rounding of the dtype (float32: a few ulps of the largest gradient; bf16: one rounding apart)."""
    x, weight, bias = inputs(dtype, shape=SHAPE)
    grad = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for path in (lambda *a: rms_norm(*a, EPS), lambda *a: eager(rms_norm, *a, EPS)):
        leaves = [tensor.clone().requires_grad_(True) for tensor in (x, weight, bias)]
        out = path(*leaves)
        out.backward(grad)
        results.append([out] + [leaf.grad for leaf in leaves])
    assert ("train", "_rms_kernel", dtype, dtype, dtype, torch.float32) in norm_functions._COMPILED
    for compiled, slow in zip(*results):
        scale = slow.abs().max().double() if dtype == torch.float32 else slow.double().abs()
        tolerance = (64 * torch.finfo(dtype).eps if dtype == torch.float32 else torch.finfo(dtype).eps) * scale
        assert torch.all((compiled.double() - slow.double()).abs() <= tolerance)


@COMPILES
@SLOW
def test_crmsnorm_gradients_match_the_eager_path():
    x = inputs(torch.float32, shape=(4, 33, 95))[0]
    grad = torch.randn(4, 33, 95, generator=torch.Generator().manual_seed(2))
    grads = []
    for path in (crms, lambda t: eager(crms, t)):
        leaf = x.clone().requires_grad_(True)
        path(leaf).backward(grad)
        grads.append(leaf.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=64 * torch.finfo(torch.float32).eps * float(grads[1].abs().max()))


def test_what_stays_on_the_eager_path(monkeypatch):
    """float64, one row, fake tensors, small inputs (the default thresholds) and float32 outside
    training use the eager path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = inputs(torch.bfloat16, shape=(2, 3, 96))[0]
    assert norm_functions._compiled_mode(x) == "infer" and norm_functions._compiled_mode(x.double()) is None
    assert norm_functions._compiled_mode(x[:1, :1]) is None
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert norm_functions._compiled_mode(torch.empty(2, 3, 96, dtype=torch.bfloat16)) is None
    monkeypatch.setattr(norm_functions, "INFERENCE_MIN_ELEMENTS", 1 << 16)
    monkeypatch.setattr(norm_functions, "COMPILE_MIN_ELEMENTS", 1 << 17)
    monkeypatch.setattr(norm_functions, "COMPILED_DTYPES", (torch.bfloat16, torch.float16))
    assert norm_functions._compiled_mode(torch.empty(1, 4, 768, dtype=torch.bfloat16)) is None
    assert norm_functions._compiled_mode(torch.empty(8, 128, 768, dtype=torch.bfloat16)) == "infer"
    weight = torch.ones(768, requires_grad=True)
    assert norm_functions._compiled_mode(torch.empty(8, 128, 768)) is None
    assert norm_functions._compiled_mode(torch.empty(8, 128, 768), weight) == "train"
    with torch.no_grad():
        assert norm_functions._compiled_mode(torch.empty(8, 128, 768), weight) is None


def test_a_callers_mistake_is_reported_by_the_eager_path_and_compiling_stays_on(monkeypatch):
    """A γ of another width never reaches the compilers (whose failure would switch them off)."""
    monkeypatch.setattr(norm_functions, "_compile", lambda *args: pytest.fail("compiled for a wrong γ"))
    x, weight, bias = (tensor.requires_grad_(True) for tensor in inputs(torch.bfloat16, shape=SHAPE))
    for recording in (torch.enable_grad, torch.inference_mode):
        with recording(), pytest.raises(RuntimeError):
            rms_norm(x, weight[:50], bias, EPS)
    assert norm_functions._COMPILE["on"]


def test_a_failed_compilation_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(norm_functions, "_compile", broken)
    monkeypatch.setattr(norm_functions, "_COMPILED", {})
    x, weight, bias = inputs(torch.bfloat16, shape=SHAPE)
    with caplog.at_level(logging.WARNING):
        outputs = [rms_norm(x, weight, bias, EPS), crms(x), rms_norm(x, weight, bias, EPS)]
    records = [record for record in caplog.records if record.name == "prenorm_convert.modeling"]
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert "eager" in records[0].getMessage() and "No working C++ compiler" in records[0].getMessage()
    assert not norm_functions._COMPILE["on"]
    assert torch.equal(outputs[0], eager(rms_norm, x, weight, bias, EPS))
    assert torch.equal(outputs[1], eager(crms, x))


@pytest.mark.parametrize("value,on", [("0", False), ("off", False), ("", False), (None, False), ("1", True), ("on", True)])
def test_environment_opt_in(monkeypatch, value, on):
    """The compiled norms are off unless PRENORM_COMPILE=1 (read when the remote code is imported)."""
    if value is None:
        monkeypatch.delenv("PRENORM_COMPILE", raising=False)
    else:
        monkeypatch.setenv("PRENORM_COMPILE", value)
    spec = importlib.util.spec_from_file_location("modeling_prenorm_env_check", norm_functions.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh._COMPILE["on"] is on
    assert (fresh._compiled_mode(torch.empty(8, 128, 768, dtype=torch.bfloat16)) == "infer") is on


@SLOW
def test_without_a_cpp_compiler_one_log_line_and_the_eager_norms(tmp_path):
    """A real failure: no C++ compiler (CXX points nowhere) and an empty inductor cache."""
    code = (
        "import torch; from prenorm_convert.modeling import rms_norm, PrenormCRMSNorm\n"
        "x = torch.randn(256, 768).to(torch.bfloat16)\n"
        "for _ in range(3): rms_norm(x, None, None, 1e-5); PrenormCRMSNorm(767, 1e-5)(x[:, 1:])\n"
        "print('ran')"
    )
    environment = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    environment["PRENORM_COMPILE"] = "1"
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ran", result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "compiled CPU norms unavailable" in lines[0], result.stderr
