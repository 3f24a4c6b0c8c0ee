"""The C++ row fold (fastdpo.scoring.backends.native, fastdpo/scoring/backends/cpu_fold.cpp): its score, softmax and gradient
against float64 on odd shapes, strided rows and the extremes; threads; its build cache and
its fallback when no compiler is there; and the CPU routes that call it (logits and fused
head, with and without a gradient) against the same routes with it off and against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdpo.scoring.backends.torch_fold as ti
from fastdpo import linear_sequence_logprobs, sequence_logprobs
from fastdpo.scoring.backends import native
from helpers import float32_level

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler for the native fold")


def _truth(z: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None = None):
    """float64 (log-probs, softmax, gradient g * (onehot(y) - softmax))."""
    ls = torch.log_softmax(z.double(), -1)
    p = ls.exp()
    lp = ls.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    grad = None if g is None else g.double().unsqueeze(-1) * (F.one_hot(y, z.shape[-1]).double() - p)
    return lp, p, grad


# V under one vector (16), under one unrolled step (64), with tails, and a vocabulary's size
SHAPES = [(1, 1), (3, 7), (2, 16), (4, 63), (5, 64), (3, 65), (37, 1009), (2, 3, 257), (3, 4, 32000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_against_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(shape, generator=g) * 4 + 3
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    w = torch.randn(shape[:-1], generator=g)
    lp, p, grad = _truth(z, y, w)
    float32_level(native.score(z, y), lp, torch.float32, "score")
    out = torch.full_like(z, float("nan"))
    float32_level(native.softmax(out, z, y), lp, torch.float32, "softmax's log-prob")
    float32_level(out, p, torch.float32, "softmax")
    gz = native.grad(torch.full_like(z, float("nan")), z, y, w)
    float32_level(gz, grad, torch.float32, "gradient")
    # in place: the same numbers
    zz = z.clone()
    torch.testing.assert_close(native.softmax(zz, zz, y), native.score(z, y), rtol=0, atol=0)
    torch.testing.assert_close(zz, out, rtol=0, atol=0)
    zz = z.clone()
    torch.testing.assert_close(native.grad(zz, zz, y, w), gz, rtol=0, atol=0)


def test_strided_rows_are_read_and_written_in_place():
    """A box of an (N, T, V) tensor (both leading strides not the packed ones) and a 2-D slice
    of rows: read where they are, nothing outside them touched."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 9, 300, generator=g) * 3
    y = torch.randint(0, 300, (2, 5), generator=g)
    w = torch.randn(2, 5, generator=g)
    z = base.clone()
    box = z[1:3, 2:7]
    lp, p, grad = _truth(box, y, w)
    float32_level(native.score(box, y), lp, torch.float32, "score")
    native.grad(box, box, y, w)
    float32_level(box, grad, torch.float32, "gradient")
    outside = torch.ones(4, 9, dtype=torch.bool)
    outside[1:3, 2:7] = False
    assert torch.equal(z[outside], base[outside])
    rows = base.view(36, 300)[5:17]
    yr = torch.randint(0, 300, (12,), generator=g)
    float32_level(native.score(rows, yr), _truth(rows, yr)[0], torch.float32, "2-D slice")
    wide = base.view(36, 300)[:, 10:250]  # rows not packed: the row stride is not V
    yw = torch.randint(0, 240, (36,), generator=g)
    float32_level(native.score(wide, yw), _truth(wide, yw)[0], torch.float32, "row stride > V")


def test_extremes():
    """NaN, +inf, and rows of -inf give NaN throughout (as float64 does); -inf entries and
    targets far below the max are exact; a target whose probability underflows float32 gets
    its exact log-probability."""
    v = 100
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, v, generator=g)
    y = torch.randint(0, v, (8,), generator=g)
    z[0, 5] = float("nan")
    z[1, 70] = float("inf")  # in the unrolled part of the row
    z[2] = float("-inf")
    z[3, 97] = float("nan")  # in the tail
    z[4, y[4]] = -200.0  # p_y ~ e^-200: 0 in float32
    z[5] = -1e30
    z[5, y[5]] = 50.0  # p_y = 1
    z[6, (y[6] + 1) % v] = 1e4  # another entry dominates: log p_y ~ -1e4
    z[7, ::3] = float("-inf")
    z[7, y[7]] = 0.5
    w = torch.randn(8, generator=g)
    lp, p, grad = _truth(z, y, w)
    bad, good = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    s = native.score(z, y)
    out = torch.empty_like(z)
    s2 = native.softmax(out, z, y)
    gz = native.grad(torch.empty_like(z), z, y, w)
    for t in (s, s2):
        assert t[bad].isnan().all()
        torch.testing.assert_close(t[good].double(), lp[good], rtol=1e-6, atol=1e-6)
    assert s[4].item() < -150 and s[5].item() == 0.0
    assert out[bad].isnan().all() and gz[bad].isnan().all()
    float32_level(out[good], p[good], torch.float32, "softmax")
    float32_level(gz[good], grad[good], torch.float32, "gradient")
    assert (out[7, ::3] == 0).all()  # exp(-inf) = 0, not a NaN


def test_a_target_outside_the_vocabulary_raises():
    z = torch.randn(3, 20)
    for bad in (20, -1):
        y = torch.tensor([0, bad, 4])
        with pytest.raises(IndexError, match="outside"):
            native.score(z, y)
        with pytest.raises(IndexError, match="outside"):
            native.grad(torch.empty_like(z), z, y, torch.ones(3))


def test_what_it_takes():
    z = torch.randn(3, 50)
    assert native.serves(z) and native.serves(z[:, 5:40])
    assert not native.serves(z.to(torch.bfloat16))
    assert not native.serves(z.t())  # rows not contiguous
    assert not native.serves(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="float32"):
        native.score(z.double(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        native.score(z, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_threads(threads, rows):
    """Rows split over threads (more threads than rows included): the same numbers as one
    thread, bit for bit."""
    g = torch.Generator().manual_seed(rows)
    z = torch.randn(rows, 70001, generator=g) * 3  # over the size where threads start
    y = torch.randint(0, 70001, (rows,), generator=g)
    w = torch.randn(rows, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.score(z, y), native.grad(torch.empty_like(z), z, y, w)
        torch.set_num_threads(threads)
        many = native.score(z, y), native.grad(torch.empty_like(z), z, y, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    float32_level(many[0], _truth(z, y)[0], torch.float32, "score")


def test_the_build_is_cached_per_host(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    monkeypatch.setattr(native, "_cpu_id", lambda: "another CPU")
    other = native.build()
    assert other != first and other.exists()


def test_no_compiler_falls_back_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-fastdpo")
    monkeypatch.setattr(native, "_lib", [])
    z = torch.randn(9, 31) * 3
    y = torch.randint(0, 31, (9,))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler") as warned:
        assert not native.available()
        assert not native.serves(z)  # tried once
    assert len(warned) == 1
    float32_level(ti.row_logprobs(z, y), _truth(z, y)[0], torch.float32, "fallback")


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])  # SSE2 only; AVX2
def test_narrower_instruction_sets(march, tmp_path, monkeypatch):
    """The vector code is written for no instruction set in particular: built for older x86
    levels (16-lane vectors split by the compiler), it gives the same float64-level numbers."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 levels")
    if march == "x86-64-v3" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("no AVX2 here")
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in native.FLAGS))
    monkeypatch.setattr(native, "_lib", [native.open_library(native.build())])
    g = torch.Generator().manual_seed(11)
    z = torch.randn(5, 1000, generator=g) * 4
    y = torch.randint(0, 1000, (5,), generator=g)
    w = torch.randn(5, generator=g)
    lp, p, grad = _truth(z, y, w)
    float32_level(native.score(z, y), lp, torch.float32, f"score, {march}")
    out = torch.empty_like(z)
    native.softmax(out, z, y)
    float32_level(out, p, torch.float32, f"softmax, {march}")
    float32_level(native.grad(torch.empty_like(z), z, y, w), grad, torch.float32, f"gradient, {march}")


def test_the_build_without_openmp(tmp_path, monkeypatch):
    """Where the compiler has no OpenMP the fold starts std::threads: the same numbers, bit for
    bit, as the OpenMP build."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(5, 70001, generator=g) * 3  # over the size where threads start
    y = torch.randint(0, 70001, (5,), generator=g)
    w = torch.randn(5, generator=g)
    want = native.score(z, y), native.grad(torch.empty_like(z), z, y, w)
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "OPENMP", "-fno-openmp")
    lib = native.build()
    assert b"GOMP" not in lib.read_bytes()
    monkeypatch.setattr(native, "_lib", [native.open_library(lib)])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = native.score(z, y), native.grad(torch.empty_like(z), z, y, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_failed_compilation_is_reported(tmp_path, monkeypatch):
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(RuntimeError, match="failed"):
        native.build()


def _count(monkeypatch) -> dict:
    """Count the calls into the fold (the routes must reach it, or the tests below prove
    nothing)."""
    calls = {"score": 0, "softmax": 0, "grad": 0}
    for name in calls:
        fn = getattr(native, name)

        def counted(*a, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*a)

        monkeypatch.setattr(native, name, counted)
    return calls


@pytest.mark.parametrize("grad", [False, True])
def test_logits_route_with_and_without_it(grad, monkeypatch):
    """sequence_logprobs on the CPU (boxes of strided rows; with a gradient, the softmax kept
    in the gradient buffer): the fold on and off agree to float32 rounding, and both match
    float64."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 13, 501, generator=g) * 3
    targets = torch.randint(0, 501, (3, 13), generator=g)
    mask = torch.rand(3, 13, generator=g) > 0.3
    lp = _truth(logits, targets)[0].masked_fill(~mask, 0).sum(-1)
    results = {}
    calls = _count(monkeypatch)
    for on in (True, False):
        monkeypatch.setattr(native, "ENABLED", on)
        x = logits.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            s = sequence_logprobs(x, targets, mask)
        if grad:
            s.backward(torch.tensor([1.0, -0.5, 2.0]))
        float32_level(s.detach(), lp, torch.float32, f"native={on}")
        results[on] = (s.detach(), x.grad)
        if on:
            # with a gradient the softmax is kept for backward: no score, no recomputed gradient
            assert calls == {"score": 0, "softmax": calls["softmax"], "grad": 0} if grad else calls["score"] > 0
            assert calls["softmax" if grad else "score"] > 0
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-5)
    if grad:
        torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-7)
        # masked rows: exact zeros
        assert (results[True][1][~mask] == 0).all()


@pytest.mark.parametrize("grad", [False, True])
def test_fused_head_with_and_without_it(grad, monkeypatch):
    """linear_sequence_logprobs on the CPU (the fused head: chunks scored, kept and
    recomputed): fold on and off agree, and match float64 through autograd."""
    g = torch.Generator().manual_seed(7)
    n, t, d, v = 3, 11, 16, 333
    h = torch.randn(n, t, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.25
    gs = torch.tensor([0.7, -1.3, 0.2])
    h64, w64 = h.double().requires_grad_(grad), w.double().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        truth = (torch.log_softmax(h64 @ w64.T, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    if grad:
        truth.backward(gs.double())
    results = {}
    calls = _count(monkeypatch)
    for on in (True, False):
        monkeypatch.setattr(native, "ENABLED", on)
        hh, ww = h.clone().requires_grad_(grad), w.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            s = linear_sequence_logprobs(hh, ww, targets, mask)
        float32_level(s.detach(), truth.detach(), torch.float32, f"native={on}")
        if grad:
            s.backward(gs)
            torch.testing.assert_close(hh.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ww.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
        results[on] = s.detach()
        if on:
            # forward scores, backward recomputes the gradient (this op keeps nothing)
            assert calls == ({"score": 1, "softmax": 0, "grad": 1} if grad else {"score": 1, "softmax": 0, "grad": 0}), calls
    torch.testing.assert_close(results[True], results[False], rtol=1e-6, atol=1e-5)


def test_the_source_ships_with_the_package():
    """A regular (non-editable) install must carry the .cpp that native.build compiles."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert native.SOURCE.name in pyproject["tool"]["setuptools"]["package-data"][native.__package__]
    assert native.SOURCE.exists()
