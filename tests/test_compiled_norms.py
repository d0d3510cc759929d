"""The compiled CPU norms of the remote code (modeling._rms_kernel, _crms_kernel under torch.compile)
against the formula of docs/math.md, with the bars tests/test_fast_norms.py sets for the eager path.

Compiling costs seconds, so the compiled functions are made once per process (as in a model) and
these tests share them: every test here lowers the size threshold so that small inputs take the
compiled path, and lets float32 take it too.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from test_fast_norms import AFFINE, EPS, inputs, reference

from prenorm_convert import modeling
from prenorm_convert.modeling import PrenormCRMSNorm, rms_norm

COMPILED = (torch.bfloat16, torch.float16, torch.float32)
SLOW = pytest.mark.slow  # each compiled variant costs a compile (1-2 s with a cold inductor cache)
REDUCED = [torch.bfloat16, pytest.param(torch.float16, marks=SLOW)]
AFFINE_FAST = [AFFINE[0]] + [pytest.param(*variant, marks=SLOW) for variant in AFFINE[1:]]


@pytest.fixture(autouse=True)
def compiled_path(monkeypatch):
    monkeypatch.setitem(modeling._COMPILE, "on", True)
    monkeypatch.setattr(modeling, "COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(modeling, "COMPILED_DTYPES", COMPILED)
    monkeypatch.setattr(modeling, "COMPILED_TRAINING_DTYPES", COMPILED)


@pytest.fixture(scope="module", autouse=True)
def compiler_works():
    """Skip this module where no C++ compiler works (the fallback is tested below either way)."""
    modeling._COMPILE["on"], threshold = True, modeling.COMPILE_MIN_ELEMENTS
    modeling.COMPILE_MIN_ELEMENTS = 1
    try:
        x, weight, bias = inputs(torch.bfloat16)
        if modeling._run_compiled(modeling._rms_kernel, x, weight, bias, modeling._epsilon(EPS, x)) is None:
            pytest.skip("torch.compile does not work here: the eager norms are used")
    finally:
        modeling.COMPILE_MIN_ELEMENTS = threshold


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def eager(function, *args):
    """The same call on today's eager path."""
    on = modeling._COMPILE["on"]
    modeling._COMPILE["on"] = False
    try:
        return function(*args)
    finally:
        modeling._COMPILE["on"] = on


def crms(x):
    return PrenormCRMSNorm(x.shape[-1], EPS)(x)


def crms_reference(x):
    """CRMSNorm in float64: the first d-1 of RMSNorm of [x̃, -Σ x̃] (docs/math.md "Pre-CRMSNorm")."""
    x64 = x.double()
    full = torch.cat([x64, -x64.sum(-1, keepdim=True)], dim=-1)
    return reference(full, None, None)[..., :-1]


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("label,use_weight,use_bias", AFFINE)
def test_reduced_precision_rounds_once(dtype, label, use_weight, use_bias):
    x, weight, bias = inputs(dtype, shape=(4, 33, 96))
    weight, bias = (weight if use_weight else None), (bias if use_bias else None)
    out = rms_norm(x, weight, bias, EPS)
    assert ("_rms_kernel", dtype, not use_weight, not use_bias, False) in modeling._COMPILED
    assert out.dtype == dtype
    scaled = reference(x, weight, None)
    expected = scaled + (bias.double() if bias is not None else 0)
    unit_roundoff = torch.finfo(dtype).eps / 2
    bound = unit_roundoff * expected.abs() * 1.001 + 2**-20 * (scaled.abs() + (bias.double().abs() if bias is not None else 0))
    assert torch.all((out.double() - expected).abs() <= bound)


@pytest.mark.parametrize("label,use_weight,use_bias", AFFINE_FAST)
def test_float32_within_float32_rounding(label, use_weight, use_bias):
    x, weight, bias = inputs(torch.float32, shape=(4, 33, 96))
    weight, bias = (weight if use_weight else None), (bias if use_bias else None)
    out = rms_norm(x, weight, bias, EPS)
    scaled = reference(x, weight, None).abs()
    bound = 8 * torch.finfo(torch.float32).eps * (scaled + (bias.double().abs() if bias is not None else 0))
    assert torch.all((out.double() - reference(x, weight, bias)).abs() <= bound)


@pytest.mark.parametrize("dtype", REDUCED + [pytest.param(torch.float32, marks=SLOW)])
def test_crmsnorm_is_accurate_to_the_output_rounding(dtype):
    x = inputs(dtype, shape=(4, 33, 95))[0]
    result, expected = crms(x), crms_reference(x)
    assert result.dtype == dtype
    ulp = torch.finfo(dtype).eps
    assert torch.all((result.double() - expected).abs() <= ulp * expected.abs() + 2**-20)


def test_no_recompiles_across_batch_and_sequence_lengths():
    """As a model runs: under inference mode, every activation an inference tensor."""
    _, weight, bias = inputs(torch.bfloat16, shape=(2, 7, 96))
    for function in (lambda t: rms_norm(t, weight, bias, EPS), crms):
        with torch.inference_mode():
            function(inputs(torch.bfloat16, shape=(2, 7, 96))[0])  # compiled here, with dynamic shapes
            before = graphs()
            for batch, seq in ((1, 2), (3, 17), (8, 128), (5, 1), (2, 7)):
                function(inputs(torch.bfloat16, shape=(batch, seq, 96), seed=batch)[0])
        assert graphs() == before


def test_input_is_never_written_and_output_is_fresh():
    x, weight, bias = inputs(torch.bfloat16, shape=(4, 33, 96))
    before = x.clone()
    outputs = [rms_norm(x, w, b, EPS) for w, b in ((weight, bias), (weight, None), (None, None))] + [crms(x)]
    assert torch.equal(x, before)
    assert all(out.data_ptr() != x.data_ptr() for out in outputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_the_eager_path(dtype):
    """Training runs through the compiled path: its gradients are the eager path's, to within the
    rounding of the dtype (float32: a few ulps of the largest gradient; bf16: one rounding apart)."""
    x, weight, bias = inputs(dtype, shape=(4, 33, 96))
    grad = torch.randn(4, 33, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for path in (lambda *a: rms_norm(*a, EPS), lambda *a: eager(rms_norm, *a, EPS)):
        leaves = [tensor.clone().requires_grad_(True) for tensor in (x, weight, bias)]
        out = path(*leaves)
        out.backward(grad)
        results.append([out] + [leaf.grad for leaf in leaves])
    assert results[0][0].grad_fn is not None and results[0][0].grad_fn is not results[1][0].grad_fn
    for compiled, slow in zip(*results):
        scale = slow.abs().max().double() if dtype == torch.float32 else slow.double().abs()
        tolerance = (64 * torch.finfo(dtype).eps if dtype == torch.float32 else torch.finfo(dtype).eps) * scale
        assert torch.all((compiled.double() - slow.double()).abs() <= tolerance)


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
    """float64, small inputs (the default threshold), fake tensors and tracing use the eager path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = inputs(torch.bfloat16, shape=(2, 3, 96))[0]
    assert modeling._compiles(x) and not modeling._compiles(x.double())
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert not modeling._compiles(torch.empty(2, 3, 96, dtype=torch.bfloat16))
    monkeypatch.setattr(modeling, "COMPILE_MIN_ELEMENTS", 1 << 17)
    monkeypatch.setattr(modeling, "COMPILED_DTYPES", (torch.bfloat16, torch.float16))
    monkeypatch.setattr(modeling, "COMPILED_TRAINING_DTYPES", COMPILED)
    assert not modeling._compiles(x)  # one token of a d=768 model takes the eager path
    assert modeling._compiles(torch.empty(8, 128, 768, dtype=torch.bfloat16))
    # float32: the compiled path only while autograd records (docs/performance.md)
    weight = torch.ones(768, requires_grad=True)
    assert not modeling._compiles(torch.empty(8, 128, 768)) and modeling._compiles(torch.empty(8, 128, 768), weight)
    with torch.no_grad():
        assert not modeling._compiles(torch.empty(8, 128, 768), weight)


def test_a_failed_compilation_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    def broken(kernel):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(modeling, "_compile", broken)
    monkeypatch.setattr(modeling, "_COMPILED", {})
    x, weight, bias = inputs(torch.bfloat16, shape=(4, 33, 96))
    with caplog.at_level(logging.WARNING):
        outputs = [rms_norm(x, weight, bias, EPS), crms(x), rms_norm(x, weight, bias, EPS)]
    records = [record for record in caplog.records if record.name == "prenorm_convert.modeling"]
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert "eager" in records[0].getMessage() and "No working C++ compiler" in records[0].getMessage()
    assert not modeling._COMPILE["on"]
    assert torch.equal(outputs[0], eager(rms_norm, x, weight, bias, EPS))
    assert torch.equal(outputs[1], eager(crms, x))


@pytest.mark.parametrize("value,on", [("0", False), ("off", False), ("1", True), (None, True)])
def test_environment_opt_out(monkeypatch, value, on):
    """PRENORM_COMPILE=0 (read when the remote code is imported) keeps every norm eager."""
    if value is None:
        monkeypatch.delenv("PRENORM_COMPILE", raising=False)
    else:
        monkeypatch.setenv("PRENORM_COMPILE", value)
    spec = importlib.util.spec_from_file_location("modeling_prenorm_env_check", modeling.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh._COMPILE["on"] is on
    assert fresh._compiles(torch.empty(8, 128, 768, dtype=torch.bfloat16)) is on


@SLOW
def test_without_a_cpp_compiler_one_log_line_and_the_eager_norms(tmp_path):
    """A real failure: no C++ compiler (CXX points nowhere) and an empty inductor cache."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from prenorm_convert.modeling import rms_norm, PrenormCRMSNorm\n"
        "x = torch.randn(256, 768).to(torch.bfloat16)\n"
        "for _ in range(3): rms_norm(x, None, None, 1e-5); PrenormCRMSNorm(767, 1e-5)(x[:, 1:])\n"
        "print('ran')"
    )
    environment = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    environment.pop("PRENORM_COMPILE", None)
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ran", result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "compiled CPU norms unavailable" in lines[0], result.stderr
