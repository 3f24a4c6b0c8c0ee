"""Autograd inside a custom op's body: the one place fastdpo touches torch's private dispatch
state.

A ``torch.library`` custom op's implementation runs below autograd: the autograd dispatch keys
are in the thread's excluded set, so nothing is recorded there, even under
``torch.enable_grad()``.  The DPO head op (:mod:`fastdpo.scoring.dpo_head_op`) takes the
gradient of each group's loss -- a few scalars per pair, any of the loss types -- with autograd
itself, so that the loss math exists once (:mod:`fastdpo.losses`) and no hand-written derivative
of every type can drift from it.  :func:`autograd_inside_op` removes the autograd keys from the
excluded set for that one small computation.

Why not a public API: ``torch.func.vjp`` computes the same gradient without these guards, but it
wraps its inputs in functorch's ``TensorWrapper``, which has no storage: under a dispatch mode
(``torch.library.opcheck``'s schema check, the tests' TorchDispatchMode spies, FlopCounterMode)
and in the compiled steps the op's body then fails ("Cannot access data pointer of Tensor that
doesn't have storage"; 19 tests of the suite, tried on torch 2.13).  So the guard stays, here.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def autograd_inside_op():
    """Let autograd record inside a custom op's body for the duration (never used under
    ``inference_mode``: without gradients the DPO head op takes no loss gradient)."""
    c = torch._C
    autograd = (
        c.DispatchKeySet(c.DispatchKey.AutogradFunctionality)
        | c.DispatchKeySet(c.DispatchKey.AutogradOther)
        | c.DispatchKeySet(c.DispatchKey.AutogradNestedTensor)
    )
    excluded = c._dispatch_tls_local_exclude_set()
    with c._ForceDispatchKeyGuard(c._dispatch_tls_local_include_set(), excluded - autograd), torch.enable_grad():
        yield
