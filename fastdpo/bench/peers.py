"""The peers' fused linear heads behind one signature, for the GPU suite and its tests.

N sequences, T positions, D hidden size, V vocabulary.

Each head adapter takes ``hidden`` (N, T, D), ``weight`` (V, D), ``targets`` (N, T) long and
``mask`` (N, T) bool, and returns float32 (N,) scores

    score_n = sum_t mask[n, t] * log_softmax(hidden[n, t] @ weight.T)[targets[n, t]]

(the summed log-probs of DPO, Rafailov et al. 2023, arXiv 2305.18290, in TRL's convention),
differentiable with respect to ``hidden`` and ``weight``.  ``targets`` at masked positions are
never read (they may be -100).  The adapter does no shifting: position t's hidden state scores
``targets[:, t]``, so the caller passes ``hidden[:, :-1]`` and ``seq[:, 1:]``, and a mask
aligned with whichever convention it measures.

* ``trl_head``: TRL's ``ChunkedLogProbFunction`` (``trl/kernels/chunked_logprob.py``, TRL 1.16),
  the kernel behind ``trl.trainer.utils.add_fused_lm_head``: cuBLAS products over
  (4096 tokens x ``chunk_size`` vocab) tiles, a Triton fold into online-logsumexp statistics on
  CUDA (torch ops elsewhere), the backward recomputing each tile.
* ``cce_head``: Apple's cut-cross-entropy ``linear_cross_entropy``
  (``cut_cross_entropy/linear_cross_entropy.py``), with ``reduction="none"``, ``shift=False`` and
  the masked targets set to its ``ignore_index``.  Its default ``"cce"`` implementation is
  Triton on CUDA only; on other devices the adapter uses its ``"torch_compile"`` one.
* ``liger_dpo_loss``: Liger-Kernel computes no log-probs on their own, only a whole loss:
  ``LigerFusedLinearDPOLoss`` (``liger_kernel/chunked_loss/dpo_loss.py``) gives the mean DPO
  loss over pairs, computing the reference scores itself from the reference hidden states.

Each adapter raises ``ImportError`` naming the package when it is missing, and
``RuntimeError`` saying why when it cannot run on the tensors' device.  :data:`PEERS` lists the
adapters; :func:`missing_modules` lists the peer modules this interpreter cannot import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import shutil
import sys
import types
from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor

# Every module the GPU suite may need besides fastdpo: the reference (x-transformers and its
# einx) and the peers.
MODULES = ("x_transformers", "einx", "liger_kernel", "trl", "cut_cross_entropy")

# The vocabulary width of one TRL tile: ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`` in
# TRL 1.16 (read there only when that module imports, see ``_trl_module``).
TRL_VOCAB_CHUNK = 32768

# cut-cross-entropy's and Liger's default ignore value (``cut_cross_entropy/constants.py``;
# ``LigerFusedLinearDPOLoss(ignore_index=-100)``).
IGNORE_INDEX = -100

# The private name under which ``_trl_standalone_module`` loads TRL's kernel file.
_TRL_STANDALONE = "_fastdpo_trl_standalone"


def missing_modules() -> list[str]:
    """The names in :data:`MODULES` that cannot be imported here, in that order.

    A module counts as missing whatever its import raises (a missing dependency, or a package
    that breaks against this torch or triton), not only ``ImportError``.
    """
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- any failure means the suite cannot use it
            missing.append(name)
    return missing


def _check_head_args(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected (N, T, D), got shape {tuple(hidden.shape)}")
    n, t, d = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight: expected (V, {d}), got shape {tuple(weight.shape)}")
    if targets.shape != (n, t):
        raise ValueError(f"targets: expected shape {(n, t)}, got {tuple(targets.shape)}")
    if targets.dtype != torch.long:
        raise TypeError(f"targets: expected torch.int64, got {targets.dtype}")
    if mask.shape != (n, t):
        raise ValueError(f"mask: expected shape {(n, t)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected torch.bool, got {mask.dtype}")
    if weight.device != hidden.device or targets.device != hidden.device or mask.device != hidden.device:
        raise ValueError(
            f"hidden, weight, targets, mask: expected one device, got {hidden.device}, {weight.device}, "
            f"{targets.device}, {mask.device}"
        )


@functools.cache
def _cpu_compiler() -> str | None:
    return next(filter(None, (shutil.which(cc) for cc in ("g++", "c++", "clang++"))), None)


def _require_cpu_compiler(who: str) -> None:
    # torch.compile's CPU backend (Inductor) builds C++; without a compiler it fails deep inside
    # the first call, so say so up front.
    if _cpu_compiler() is None:
        raise RuntimeError(f"{who}: torch.compile on the CPU needs a C++ compiler (g++ or clang++), none found")


# --- TRL ---------------------------------------------------------------------------------


def _no_zero3_gather(*params: Tensor):
    """TRL's ``maybe_gather_lm_head_ctx`` when DeepSpeed ZeRO-3 is off: a null context."""
    return nullcontext()


def _trl_standalone_module(path: str) -> types.ModuleType:
    """TRL's ``chunked_logprob.py`` loaded as ``_fastdpo_trl_standalone.kernels.chunked_logprob``.

    Its backward runs ``from ..trainer.utils import maybe_gather_lm_head_ctx``, and
    ``trl/trainer/utils.py`` imports ``datasets`` (and accelerate, pandas, ...) at its top.
    Loaded under a private package whose ``trainer.utils`` holds only that function, for the
    no-ZeRO-3 case, the file's code runs unchanged without ``datasets``; the real ``trl``
    modules are left alone.
    """
    name = f"{_TRL_STANDALONE}.kernels.chunked_logprob"
    if name in sys.modules:
        return sys.modules[name]
    packages = {}
    for sub in ("", ".kernels", ".trainer"):
        pkg = types.ModuleType(_TRL_STANDALONE + sub)
        pkg.__path__ = []  # a package, so relative imports below it resolve
        packages[pkg.__name__] = pkg
    utils = types.ModuleType(f"{_TRL_STANDALONE}.trainer.utils")
    utils.maybe_gather_lm_head_ctx = _no_zero3_gather
    packages[utils.__name__] = utils
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"trl_head: cannot load TRL's kernel file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules.update(packages)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for key in (name, *packages):
            sys.modules.pop(key, None)
        raise
    return module


# (module, route) once found: a failed ``import trl.trainer.utils`` is not cached by Python,
# and retrying it on every call would land inside the suite's timings.
_trl_found: tuple[types.ModuleType, str] | None = None


def _trl_module() -> tuple[types.ModuleType, str]:
    """TRL's chunked log-prob module and how it was loaded (``"trl"`` or ``"standalone: why"``)."""
    global _trl_found
    if _trl_found is None:
        _trl_found = _find_trl_module()
    return _trl_found


def _find_trl_module() -> tuple[types.ModuleType, str]:
    try:
        module = importlib.import_module("trl.kernels.chunked_logprob")
    except ImportError as err:
        raise ImportError(
            f"trl_head needs TRL >= 1.16 (trl.kernels.chunked_logprob), which cannot be imported: {err}"
        ) from err
    try:
        importlib.import_module("trl.trainer.utils")
    except Exception as err:  # noqa: BLE001 -- e.g. no `datasets`, or one that breaks against pyarrow
        return _trl_standalone_module(module.__file__), f"standalone: trl.trainer.utils does not import ({err})"
    return module, "trl"


def trl_route() -> str:
    """How :func:`trl_head` reaches TRL's kernel here: ``"trl"`` (the package, as TRL's trainer
    does) or ``"standalone: <why>"`` (its file under a private name, see ``_trl_standalone_module``)."""
    return _trl_module()[1]


def trl_head(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = TRL_VOCAB_CHUNK,
) -> Tensor:
    """Per-sequence summed log-probs through TRL's ``ChunkedLogProbFunction``, float32 (N,):
    :func:`trl_token_outputs`'s log-probs summed over each sequence."""
    return trl_token_outputs(hidden, weight, targets, mask, temperature=temperature, chunk_size=chunk_size)[0].sum(-1)


def trl_token_outputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    outputs: tuple[str, ...] = (),
    temperature: float = 1.0,
    chunk_size: int = TRL_VOCAB_CHUNK,
) -> tuple[Tensor | None, ...]:
    """TRL's per-token fields through its ``ChunkedLogProbFunction``, each (N, T) and zero
    where ``mask`` is False: ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``,
    the optional ones None unless named in ``outputs`` (TRL's ``FusedCausalLMOutput`` fields;
    its KTO trainer asks for ``("entropy", "mean_logits")``).

    As ``add_fused_lm_head`` calls it (``trl/trainer/utils.py``, TRL 1.16): no bias, no logit
    softcap, ``logit_scale=1``, the logits divided by ``temperature``, tiles ``chunk_size``
    wide.  On CUDA (where TRL's Triton fold runs) only the masked-in rows are scored, then
    scattered back; elsewhere every row is scored with its target clamped to a valid id and
    masked afterwards -- TRL's own two routes.  TRL takes no ignore index: the mask is applied
    by this selection.
    """
    _check_head_args(hidden, weight, targets, mask)
    module, _ = _trl_module()
    fn = module.ChunkedLogProbFunction
    # ChunkedLogProbFunction.forward(hidden, weight, bias, targets, temperature, chunk_size,
    #                                final_logit_softcapping, logit_scale, outputs)
    if module._use_triton(hidden.device):
        per_row = fn.apply(hidden[mask], weight, None, targets[mask], temperature, chunk_size, None, 1.0, outputs)
        return tuple(None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_row)
    safe = torch.where(mask, targets, 0).reshape(-1)
    per_row = fn.apply(hidden.reshape(-1, hidden.shape[-1]), weight, None, safe, temperature, chunk_size,
                       None, 1.0, outputs)
    return tuple(None if x is None else x.view(mask.shape).masked_fill(~mask, 0) for x in per_row)


# --- cut-cross-entropy ----------------------------------------------------------------------


def cce_head(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    impl: str = "auto",
    filter_eps: float | str | None = "high",
) -> Tensor:
    """Per-sequence summed log-probs through cut-cross-entropy's ``linear_cross_entropy``, float32 (N,).

    ``-linear_cross_entropy(hidden, weight, targets', reduction="none", shift=False).sum(-1)``
    with ``targets' = targets`` where ``mask`` and ``ignore_index`` (-100) elsewhere; CCE returns
    0 at ignored positions.  ``impl="auto"`` picks ``"cce"`` (its Triton kernels) on CUDA and
    ``"torch_compile"`` (one ``torch.compile``'d ``F.cross_entropy`` over ``hidden @ weight.T``)
    elsewhere.  ``filter_eps`` is CCE's gradient filter (its default ``"high"`` skips vocabulary
    blocks whose softmax entries are all below ``eps(dtype) / 32``; ``None`` turns it off); only
    the ``"cce"`` implementation reads it.
    """
    _check_head_args(hidden, weight, targets, mask)
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as err:
        raise ImportError(f"cce_head needs the cut-cross-entropy package: {err}") from err
    if impl == "auto":
        impl = "cce" if hidden.device.type == "cuda" else "torch_compile"
    if impl == "cce" and hidden.device.type != "cuda":
        raise RuntimeError(
            f"cce_head: cut-cross-entropy's 'cce' implementation is Triton kernels for CUDA, the tensors are "
            f"on {hidden.device}; use impl='torch_compile' (or 'auto')"
        )
    if impl == "torch_compile" and hidden.device.type == "cpu":
        _require_cpu_compiler("cce_head(impl='torch_compile')")
    nll = linear_cross_entropy(
        hidden, weight, targets.masked_fill(~mask, IGNORE_INDEX),
        ignore_index=IGNORE_INDEX, reduction="none", shift=False, filter_eps=filter_eps, impl=impl,
    )
    return -nll.float().sum(-1)


# --- Liger-Kernel ---------------------------------------------------------------------------


def liger_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    beta: float = 0.1,
    *,
    average_log_prob: bool = False,
    compiled: bool = True,
    chunk_size: int = 1,
) -> Tensor:
    """Mean DPO loss over pairs through Liger-Kernel's ``LigerFusedLinearDPOLoss``, a float32 scalar.

    ``hidden`` is (2B, T, D) with the B chosen sequences first, then the B rejected ones, pair b
    being rows b and B + b (Liger splits the batch at ``target.shape[0] // 2``); ``targets`` and
    ``mask`` likewise (2B, T).  The loss is

        mean_b -logsigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l)))

    where ``pi`` are the summed masked log-probs (TRL's convention; ``average_log_prob=True``
    divides by the mask count instead, without a clamp: an empty row gives NaN) of
    ``hidden @ weight.T`` and ``ref`` the same of ``ref_hidden @ ref_weight.T``.  Liger takes no
    precomputed reference scores: it recomputes them from ``ref_hidden``/``ref_weight`` inside its
    chunk loop, under ``no_grad``.  Both ``None`` means no reference model (``ref = 0``).

    Liger computes the gradients with respect to ``hidden`` and ``weight`` inside its forward
    (``torch.func.grad_and_value`` per chunk of ``chunk_size`` pairs, ``torch.compile``'d when
    ``compiled``); ``backward`` only scales them.
    """
    _check_head_args(hidden, weight, targets, mask)
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden: expected 2B rows (B chosen, then B rejected), got {hidden.shape[0]}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden, ref_weight: pass both (a reference model) or neither")
    if ref_hidden is not None:
        _check_head_args(ref_hidden, ref_weight, targets, mask)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as err:
        raise ImportError(f"liger_dpo_loss needs the liger-kernel package: {err}") from err
    if compiled and hidden.device.type == "cpu":
        _require_cpu_compiler("liger_dpo_loss(compiled=True)")
    loss_fn = LigerFusedLinearDPOLoss(
        ignore_index=IGNORE_INDEX, beta=beta, compute_nll_loss=False, compiled=compiled,
        use_ref_model=ref_hidden is not None, average_log_prob=average_log_prob, chunk_size=chunk_size,
        loss_type="sigmoid",
    )
    # forward(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias) returns
    # (loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll, ...)).
    out = loss_fn(weight, hidden, targets.masked_fill(~mask, IGNORE_INDEX), None, ref_hidden, ref_weight, None)
    return out[0]


# name -> (adapter, what it returns, the pip distribution that provides it)
PEERS: dict[str, tuple[Callable[..., Tensor], str, str]] = {
    "trl": (trl_head, "per-sequence summed log-probs, float32 (N,)", "trl"),
    "cut-cross-entropy": (cce_head, "per-sequence summed log-probs, float32 (N,)", "cut-cross-entropy"),
    "liger": (liger_dpo_loss, "mean DPO loss over pairs (TRL conventions), float32 scalar", "liger-kernel"),
}
