"""Pure-torch implementation of the masked sequence log-prob op (the CPU path).

Dimensions: N sequences, T positions, V vocabulary.

For a row (n, t) with logits z and target y, ``logp = z_y - logsumexp(z)``; a sequence's score
is ``sum_t m_t * logp_t``.  Its gradient w.r.t. row (n, t) is ``g_n * m_t * (onehot(y) -
softmax(z))``, since ``d logsumexp(z) / dz = softmax(z)``.  The logits are walked in boxes of
counted rows small enough to stay in cache (:func:`box_plan`: in a DPO batch, each sequence's
completion, the prompt and padding rows never read), and each box goes through ATen's fused,
vectorized softmax: the exp of every element is what a CPU spends its time on, so the path is
built around computing it as few times as possible.

* forward: ``softmax`` of the box, then ``log(p_y)`` (:func:`row_logprobs_into`; an exact
  max/log-sum form where p_y is tiny).  When the logits will get a gradient (float32, not in
  place), the softmax is written into the buffer that becomes the gradient; when nothing needs
  the softmax (no gradient, no WPO sums) and the box is large, ``(z_y - m) - log sum exp(z -
  m)`` compiled by inductor instead (:func:`compiled_score`: no probability written);
* backward: that buffer times ``-g`` plus ``g`` at the targets (:func:`backward_from_probs`, no
  exp at all), or, for in-place or 16-bit logits, the softmax again into the gradient
  (:func:`backward`).

Where float32 rows have the C++ fold (:mod:`fastdpo.scoring.backends.native`: built for the host at first use),
the score, the softmax and the gradient of a box are each one call to it instead (the same
passes with four accumulators each and a polynomial exp: the score and the softmax in about
half the time, the gradient in 0.7x); the ATen and inductor code above serves 16-bit logits
and hosts without a compiler.

A +inf or NaN in a row makes its log-probs and gradient NaN, as in float64.  No (N, T, V)
log-softmax is ever built, arithmetic is float32 whatever the input dtype, and the gradient
takes one (N, T, V) buffer (or, when asked, the logits themselves).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import native

# Rows of a box are chosen so that one float32 copy of the box is about box_bytes(): large
# enough that per-box dispatch (~10 us an op) is noise, small enough that each thread's share
# of the box stays in its L2 cache across the box's passes (and under glibc's mmap threshold,
# so its temporary is not faulted in anew at every call).  None: that rule, read at call time
# (:func:`box_bytes`); a number of bytes overrides it (tests shrink it to exercise box
# boundaries).  The measurements behind it: docs/performance-log.md, "Budgets".
BOX_BYTES: int | None = None
BOX_BYTES_RANGE = (1 << 20, 32 << 20)
_FALLBACK_L2 = 1 << 20  # where the host does not say (not Linux): a common L2 size


def box_bytes() -> int:
    """The box budget: :data:`BOX_BYTES` when set, else one L2 cache per thread (torch's
    intra-op threads at call time times the L2 size of a core, :func:`l2_cache_bytes`), within
    :data:`BOX_BYTES_RANGE`.  Softmax splits a box's rows over the threads, so each thread's
    rows then fit its own L2."""
    if BOX_BYTES is not None:
        return BOX_BYTES
    low, high = BOX_BYTES_RANGE
    return min(max(torch.get_num_threads() * l2_cache_bytes(), low), high)


@functools.cache
def l2_cache_bytes() -> int:
    """The L2 cache size of one core, from Linux's sysfs (cpu0), else 1 MiB."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
                return int(size.rstrip("KMG")) * scale
    except (OSError, ValueError):
        pass
    return _FALLBACK_L2


# What a box holds: no counted row (skipped), only counted rows, or both.
EMPTY, FULL, MIXED = 0, 1, 2


def rows_per_box(v: int, elem_bytes: int, budget: int) -> int:
    """Rows of V elements of ``elem_bytes`` each that fit ``budget`` bytes (at least one)."""
    return max(1, budget // (elem_bytes * max(v, 1)))


def box_plan(mask: Tensor, v: int, budget: int) -> list[tuple[slice, slice, int]]:
    """The (N, T) grid cut into boxes of at most ``rows_per_box(v, 4, budget)`` rows, each
    tagged FULL or MIXED: whole sequences when a sequence fits a box, else runs of positions
    of one sequence, so slicing a (N, T, ...) tensor with a box is always a view.

    In a DPO batch each sequence's counted positions are one run (the completion, between the
    prompt and the padding): a box of one or two sequences then covers just those runs, FULL,
    so prompt and padding rows cost no exp at all (a third of the rows at the bench's sizes;
    exp of -inf/subnormal arguments is also a slow path on x86).  A box of many short sequences,
    or of a sequence whose counted positions have holes, stays whole and MIXED: its masked
    rows are computed, then dropped (forward) or zeroed (backward).  Boxes with no counted row
    are left out.  Reading the mask costs one device-to-host copy of 3N integers (free on
    CPU, the one sync of this path on CUDA).
    """
    n, t = mask.shape
    if n == 0 or t == 0:
        return []
    rows = rows_per_box(v, 4, budget)
    m = mask.to(torch.int8)
    count = m.sum(-1)
    first = m.argmax(-1)
    last = t - 1 - m.flip(-1).argmax(-1)
    counts, firsts, lasts = torch.stack((count, first, last)).tolist()
    one_run = [c > 0 and c == b - a + 1 for c, a, b in zip(counts, firsts, lasts)]
    plan = []

    def runs(i: int, lo: int, hi: int) -> None:
        """Sequence i's positions [lo, hi) cut into boxes; its counted run alone when it is one."""
        if one_run[i]:
            lo, hi, kind = max(lo, firsts[i]), min(hi, lasts[i] + 1), FULL
        else:
            kind = MIXED
        for t0 in range(lo, hi, rows):
            plan.append((slice(i, i + 1), slice(t0, min(t0 + rows, hi)), kind))

    per = rows // t if t <= rows else 0
    if per == 0:  # long sequences: boxes within one sequence
        for i in range(n):
            if counts[i]:
                runs(i, 0, t)
        return plan
    for n0 in range(0, n, per):
        n1 = min(n0 + per, n)
        counted = sum(counts[n0:n1])
        if counted == 0:
            continue
        if counted == (n1 - n0) * t:
            plan.append((slice(n0, n1), slice(0, t), FULL))
        elif n1 - n0 <= 2:  # one op per sequence costs little next to the rows it skips
            for i in range(n0, n1):
                if counts[i]:
                    runs(i, 0, t)
        else:
            plan.append((slice(n0, n1), slice(0, t), MIXED))
    return plan


def row_logprobs(z: Tensor, y: Tensor, sq_out: Tensor | None = None) -> Tensor:
    """float32 log-probs of targets ``y`` (...,) under rows of logits ``z`` (..., V), any float
    dtype, ``z`` left as it is: the C++ fold (:func:`fastdpo.scoring.backends.native.score`) where it serves,
    then the compiled score (:func:`compiled_score`), else :func:`row_logprobs_into` a float32
    temporary (``z`` then box-sized)."""
    if sq_out is None:
        if native.serves(z):
            return native.score(z, y)
        score = compiled_score(z)
        if score is not None:
            v = z.shape[-1]
            return score(z.reshape(-1, v), y.reshape(-1)).view(y.shape)
    return row_logprobs_into(torch.empty(z.shape, dtype=torch.float32, device=z.device), z, y, sq_out)


# ----------------------------------------------------------------------------- compiled score

# Scoring rows whose softmax is not kept (the reference, evaluation, recomputed chunks) needs
# only ``log p_y = (z_y - m) - log sum_v exp(z_v - m)``: one max pass and one exp-and-sum pass
# over each row, nothing written but a float per row.  ATen has no such fused op (its softmax
# writes every probability; ``logsumexp`` builds temporaries), so on the CPU, where the C++ fold
# (fastdpo.scoring.backends.native) does not take the rows (16-bit logits, or no compiler), the formula below
# goes through inductor's C++ backend (``torch.compile``, sizes dynamic: one compilation per
# dtype, cached on disk by inductor: the first large call of a process pays the compilation),
# faster than the boxed ATen softmax on a chunk (docs/performance-log.md, "Compiled score").
# Calls under COMPILE_MIN_ELEMENTS logits keep the ATen path: there the compilation and each
# call's dispatch are not paid back.  False, or
# FASTDPO_COMPILE=0 in the environment: the ATen path everywhere.  Where compiling fails (no
# C++ compiler, say) the ATen path is used, with one warning.
COMPILE = os.environ.get("FASTDPO_COMPILE", "1") != "0"
COMPILE_MIN_ELEMENTS = 1 << 20
_compiled: dict = {}


def _score(z: Tensor, y: Tensor) -> Tensor:
    """Target log-probs of rows ``z`` (M, V), max and log-sum kept apart (exact where p_y
    underflows): the math the compiled score is generated from."""
    z = z.float()
    m = z.amax(-1, keepdim=True)  # a NaN or +inf in a row makes the row's result NaN
    s = (z - m).exp().sum(-1)
    return (z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - m.squeeze(-1)) - s.log()


def compiled_score(z: Tensor):
    """A function ``(z (M, V), y (M,)) -> log-probs (M,)``: the compiled :func:`_score` for
    logits like ``z`` (no autograd graph), or None where it does not serve: off
    (:data:`COMPILE`), not a CPU tensor, fewer than :data:`COMPILE_MIN_ELEMENTS` logits, or
    compiling failed."""
    if not COMPILE or z.device.type != "cpu" or z.numel() < COMPILE_MIN_ELEMENTS:
        return None
    fn = _compiled.get("score")
    if fn is None:
        fn = False
        try:
            compiled = torch.compile(_score, dynamic=True)
            with torch.no_grad():
                compiled(torch.randn(3, 5), torch.tensor([0, 2, 4]))
            fn = _no_grad(compiled)
        except Exception as e:  # noqa: BLE001 -- any failure to build means: not here
            warnings.warn(f"fastdpo: compiling the CPU score failed ({type(e).__name__}: {e}); using ATen ops", stacklevel=2)
        _compiled["score"] = fn
    return fn or None


def _no_grad(fn):
    """``fn`` called under ``no_grad`` (so one compiled graph serves callers with and without
    autograd on)."""

    def call(z: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return fn(z, y)

    return call


def row_grad_into(out: Tensor, z: Tensor, y: Tensor, g: Tensor) -> Tensor:
    """Write ``g * (onehot(y) - softmax(z))`` per row into float32 ``out`` (may be ``z``
    itself): one fused softmax written straight into ``out``, one multiply in place (the box
    is still in cache), one scatter.  ``g`` has z's shape minus V."""
    if native.serves(z) and native.serves(out):
        return native.grad(out, z, y, g)
    if z.dtype == torch.float32:
        torch._softmax(z, -1, False, out=out)  # in place too: each row is read before written
    else:
        out.copy_(torch.softmax(z, -1, dtype=torch.float32))
    g = g.unsqueeze(-1)
    out.mul_(g.neg())
    return out.scatter_add_(-1, y.unsqueeze(-1), g)


def forward(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    probs: Tensor | None = None,
    weights: Tensor | None = None,
    wpo_sums: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Return (scores float32 (N,), row stats float32 (2, N, T)).

    The stats are zeros: this path's backward reads none (it recomputes each box's softmax,
    or finishes ``probs``; the op's other implementation, the kernels, saves each row's max
    and log-sum there).  ``targets`` is int64 and ``mask`` bool, both (N, T); targets at masked
    positions are never read (they may hold any value, e.g. -100).

    ``probs``: an optional float32 (N, T, V) buffer (float32 logits only) that receives
    ``softmax(logits)`` at the boxes' rows, for :func:`backward_from_probs`: the softmax the
    backward needs, computed once instead of twice (exp is most of the work on a CPU), for
    the memory of a gradient buffer allocated now rather than in backward.

    ``weights``: optional float32 (N, T) weight of each log-prob in its score (LD-DPO,
    :mod:`fastdpo.losses.weighting`).  ``wpo_sums``: an optional float32 (2, N) buffer that receives
    per sequence ``sum_t m_t log sum_v p_v^2`` (:func:`log_sum_sq`) and the unweighted
    ``sum_t m_t log p_t`` (WPO's).
    """
    n, t, v = logits.shape
    plan = box_plan(mask, v, box_bytes())
    logp = torch.zeros(n, t, dtype=torch.float32, device=logits.device)
    sq = torch.zeros(n, t, dtype=torch.float32, device=logits.device) if wpo_sums is not None else None
    safe = torch.where(mask, targets, 0)
    for bn, bt, _ in plan:
        sq_box = sq[bn, bt] if sq is not None else None
        if probs is None:
            logp[bn, bt] = row_logprobs(logits[bn, bt], safe[bn, bt], sq_box)
        else:
            logp[bn, bt] = row_logprobs_into(probs[bn, bt], logits[bn, bt], safe[bn, bt], sq_box)
    # where, not multiply: a non-finite value in a masked row must not reach the score.
    scores = torch.where(mask, logp if weights is None else logp * weights, 0.0).sum(-1)
    if wpo_sums is not None:
        # float64 sums: WPO exponentiates their means (as RowPlan.sequence_sums, for the same bits)
        wpo_sums[0] = torch.where(mask, sq, 0.0).sum(-1, dtype=torch.float64)
        wpo_sums[1] = torch.where(mask, logp, 0.0).sum(-1, dtype=torch.float64)
    return scores, torch.zeros(2, n, t, dtype=torch.float32, device=logits.device)


def log_sum_sq(p: Tensor) -> Tensor:
    """``log sum_v p_v^2`` per row of probabilities ``p`` (..., V) (TRL's ``log_sum_sq_probs``,
    WPO's normalizer): one dot product per row, no exp, no temporary (``vecdot`` sums as
    accurately as a pairwise sum; ``vector_norm``, a little faster, errs by ~4e-6 relative at
    V = 32000).  Safe where probabilities underflow: the largest is at least 1/V, so the sum
    is never 0."""
    return torch.linalg.vecdot(p, p).log_()


def row_weights(grad_scores: Tensor, mask: Tensor, weights: Tensor | None) -> Tensor:
    """(N, T) float32 weight of each row's log-prob gradient: ``grad_scores[n] * weights[n, t]``
    where the row counts, 0 elsewhere (whatever ``weights`` holds there)."""
    g = grad_scores.float().unsqueeze(-1)
    return torch.where(mask, g if weights is None else g * weights, 0.0)


# Below this probability a float32 softmax entry has lost digits (normal floats end at 1.2e-38):
# log-probs under log(TINY) = -69 are taken from the row max and log-sum instead.
TINY = 1e-30


def row_logprobs_into(p: Tensor, z: Tensor, y: Tensor, sq_out: Tensor | None = None) -> Tensor:
    """float32 log-probs of targets ``y`` under rows of float32 logits ``z``, writing
    ``softmax(z)`` into ``p`` (which may be ``z`` itself), and, given ``sq_out`` (z's shape
    minus V), each row's :func:`log_sum_sq` into it.

    The log-prob is ``log(p_y)`` (within an ulp of p_y: as close as log_softmax gets), except
    where p_y is under :data:`TINY`, where it is ``(z_y - m) - log_s`` with the row max m and
    the log-sum read off the softmax (its entry at the row max is exp(0) / s): max and log-sum
    kept apart, no logsumexp rounded into one number.  On a CPU that second form costs a pass
    only for boxes that need it."""
    if sq_out is None and native.serves(z) and native.serves(p):
        return native.softmax(p, z, y)  # (z_y - m) - log s, the exact form, at every p_y
    inplace = p.data_ptr() == z.data_ptr()
    if inplace:  # the logits are gone once the softmax is written: keep what the exact form needs
        m = z.amax(-1)
        z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if z.dtype == torch.float32:
        torch._softmax(z, -1, False, out=p)  # in place too: each row is read before it is written
    else:
        p.copy_(torch.softmax(z, -1, dtype=torch.float32))
    if sq_out is not None:
        sq_out.copy_(log_sum_sq(p))
    p_y = p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    logp = p_y.log()
    low = p_y < TINY  # NaN compares False: a NaN row keeps log(NaN) = NaN
    if p.device.type == "cpu" and not bool(low.any()):
        return logp
    if not inplace:
        m = z.amax(-1).float()
        z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1).float()
    log_s = p.amax(-1).log_().neg_()
    return torch.where(low, (z_y - m) - log_s, logp)


def backward(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    stats: Tensor,
    grad_scores: Tensor,
    *,
    inplace: bool = False,
    weights: Tensor | None = None,
) -> Tensor:
    """Gradient ``g_n * w_nt * m_t * (onehot(y) - softmax(z))`` in the logits dtype (``w``:
    ``weights``, 1 without them).

    With ``inplace=True`` the gradient overwrites ``logits`` (which is returned).  Masked rows
    get exact zeros whatever their logits hold, without being read when a box could leave them
    out.  ``stats`` (the forward's) is not read.
    """
    plan = box_plan(mask, logits.shape[-1], box_bytes())
    out = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    g = row_weights(grad_scores, mask, weights)  # (N, T)
    safe = torch.where(mask, targets, 0)
    direct = out.dtype == torch.float32
    covered = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)  # rows a box wrote
    for bn, bt, kind in plan:
        o = out[bn, bt]
        buf = o if direct else torch.empty(o.shape, dtype=torch.float32, device=o.device)
        # the softmax reads the logits before the multiply writes over them (in place: same box)
        row_grad_into(buf, logits[bn, bt], safe[bn, bt], g[bn, bt])
        if kind == MIXED:
            _zero_rows(buf, ~mask[bn, bt])
        if not direct:
            o.copy_(buf)
        covered[bn, bt] = True
    _zero_rows(out, ~covered)  # prompt, padding: rows no box covered get exact zeros
    return out


def _zero_rows(x: Tensor, rows: Tensor) -> None:
    """Set the V-rows of ``x`` (..., V) where the bool ``rows`` (...) is True to exact zeros: a
    row fill by index on the CPU (ten times a broadcast masked_fill's speed), masked_fill
    elsewhere (no host sync)."""
    if x.device.type == "cpu" and x.is_contiguous():
        index = rows.reshape(-1).nonzero().squeeze(1)
        if index.numel():
            x.view(-1, x.shape[-1]).index_fill_(0, index, 0.0)
    else:
        x.masked_fill_(rows.unsqueeze(-1), 0.0)


def backward_from_probs(
    probs: Tensor, targets: Tensor, mask: Tensor, grad_scores: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Turn the ``probs`` buffer :func:`forward` filled into the gradient, in place, and return
    it: a multiply and a scatter per box (no exp), zeros at every row that does not count."""
    plan = box_plan(mask, probs.shape[-1], box_bytes())
    g = row_weights(grad_scores, mask, weights)
    safe = torch.where(mask, targets, 0)
    covered = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    for bn, bt, kind in plan:
        p, gb = probs[bn, bt], g[bn, bt].unsqueeze(-1)
        p.mul_(gb.neg()).scatter_add_(-1, safe[bn, bt].unsqueeze(-1), gb)
        if kind == MIXED:
            _zero_rows(p, ~mask[bn, bt])
        covered[bn, bt] = True
    _zero_rows(probs, ~covered)
    return probs


# ----------------------------------------------------------------------------- the fold of the fused head


def chunk_slices(m: int, rows: int, start: int = 0) -> list[slice]:
    """[start, m) cut into as few slices of at most ``rows`` rows as it takes, as even as
    possible, so no slice is a short remainder (a product's time per row grows as its rows
    fall to a few hundred on the CPU: docs/performance-log.md, "Larger products, and no gradient pass over the kept rows").  The head's
    chunks (:mod:`fastdpo.scoring.rows`) and a fold's cache-sized parts are cut this way."""
    n = -(-(m - start) // rows) if m > start else 0
    return [slice(start + (m - start) * i // n, start + (m - start) * (i + 1) // n) for i in range(n)]


class TorchFold:
    """The elementwise work on float32 logits: one call of the C++ fold per chunk
    (:mod:`fastdpo.scoring.backends.native`; it reads each row twice while the row is in cache), else ATen's
    fused softmax box by box (cache-sized; :mod:`fastdpo.scoring.backends.torch_fold`).  Logits kept for the
    gradient (the DPO head op's) are turned into probabilities in place while they are scored,
    which then meet the gradient products as they are (:func:`fastdpo.scoring.rows.kept_grads`): one exp per
    element in all, where scoring and then differentiating the logits would take two (exp is
    what a CPU spends its time on here)."""

    name = "torch"
    keeps_probabilities = True  # stats(keep=True) leaves softmax(z) in z (capped logits with a softcap)

    @staticmethod
    def dtype(weight: Tensor) -> torch.dtype:
        return torch.float32

    @staticmethod
    def stats(
        z: Tensor, y: Tensor, keep: bool = False, sq_out: Tensor | None = None, softcap: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """(row stats (2, rows): zeros, this fold's gradient reads none; target log-probs
        (rows,)) of float32 logits ``z``.  With ``keep``, ``z`` becomes ``softmax(z)`` in place,
        for :meth:`grad_`.  ``sq_out`` (rows,), if given, receives each row's ``log sum_v
        p_v^2`` (:func:`fastdpo.scoring.backends.torch_fold.log_sum_sq`, from the same softmax).  With a
        ``softcap`` the rows are capped in place first, and kept as capped logits: the
        gradient needs them for the cap's derivative."""
        rows = z.shape[0]
        row_stats = torch.zeros(2, rows, dtype=torch.float32, device=z.device)
        if softcap is None and sq_out is None and native.serves(z):  # the whole chunk in one call
            return row_stats, (native.softmax(z, z, y) if keep else native.score(z, y))
        score = compiled_score(z) if not keep and softcap is None and sq_out is None else None
        if score is not None:  # the whole chunk at once: two passes per row, nothing written
            return row_stats, score(z, y)
        logp = torch.empty(rows, dtype=torch.float32, device=z.device)
        for r in _cache_rows(z):
            zr, sq = z[r], (sq_out[r] if sq_out is not None else None)
            if softcap is not None:
                _cap_(zr, softcap)
            if keep and softcap is None:
                logp[r] = row_logprobs_into(zr, zr, y[r], sq)
            else:
                logp[r] = row_logprobs(zr, y[r], sq)
        return row_stats, logp

    @staticmethod
    def grad_(
        z: Tensor, row_stats: Tensor, y: Tensor, g: Tensor, scale: float | None, kept: bool = False,
        softcap: float | None = None,
    ) -> Tensor:
        """Turn ``z`` into d(sum_m g_m logp_m)/d(h @ W.T) in place (the scale folded into the row
        weights): from the probabilities :meth:`stats` left there when ``kept``, else from
        logits (one fused softmax).  With a ``softcap``: from the capped logits :meth:`stats`
        left when ``kept`` (else the logits are capped here), times the cap's derivative
        ``1 - (z / softcap)^2`` (as torch's own tanh backward forms it)."""
        if scale is not None:
            g = g * scale
        if softcap is None and not kept and native.serves(z):
            return native.grad(z, z, y, g)
        for r in _cache_rows(z):
            zr = z[r]
            if softcap is None and kept:
                gr = g[r].unsqueeze(1)
                zr.mul_(gr.neg()).scatter_add_(1, y[r].unsqueeze(1), gr)
                continue
            if softcap is None:
                row_grad_into(zr, zr, y[r], g[r])
                continue
            if not kept:
                _cap_(zr, softcap)
            slope = torch.div(zr, softcap).square_().neg_().add_(1.0)  # a cache-sized box
            row_grad_into(zr, zr, y[r], g[r]).mul_(slope)
        return z


def _cap_(z: Tensor, softcap: float) -> Tensor:
    """``z`` (float32) replaced by ``softcap * tanh(z / softcap)``, as Gemma 2's forward caps
    its logits (there in the model's dtype, here in float32)."""
    return z.div_(softcap).tanh_().mul_(softcap)


def _cache_rows(z: Tensor) -> list[slice]:
    """Row ranges of a chunk ``z`` small enough to stay in cache across the fold's passes
    (the chunk itself is a GEMM output far larger than any cache)."""
    return chunk_slices(z.shape[0], rows_per_box(z.shape[1], 4, box_bytes()))
