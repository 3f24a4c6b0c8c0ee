"""Bench providers for the reference-free loss families (``fastdpo.ORPO``, ``fastdpo.CPO``).

Loaded with ``--provider-module``, they are timed beside ``fastdpo-torch`` (sigmoid DPO) on the
same model and batch (step workload; the policy only: these losses have no reference model)::

    fastdpo bench --size medium --workload step --mode forward+backward \\
        --provider-module benchmarks/family_providers.py \\
        --providers fastdpo-torch,fastdpo-orpo,fastdpo-cpo,fastdpo-simpo

Each module runs with its defaults (x-transformers' conventions, the fused head: the "scores"
route); their losses differ from DPO's, so no ``same_loss_as``.
"""

from __future__ import annotations

from fastdpo.bench.config import BETA
from fastdpo.bench.inputs import make_batch, make_models, make_step
from fastdpo.bench.registry import register


def _family(make):
    def build(workload, mode, cfg):
        bt = make_batch(cfg)
        policy, _ = make_models(cfg)
        module = make(policy)
        return make_step(lambda: module(bt.pref, bt.unpref, **bt.dpo_kwargs), mode, module.parameters())

    return build


def _orpo(model):
    from fastdpo import ORPO

    return ORPO(model, beta=BETA)


def _cpo(**kw):
    def make(model):
        from fastdpo import CPO

        return CPO(model, **kw)

    return make


register("fastdpo-orpo", workloads=("step",), help="fastdpo.ORPO: odds ratio + chosen NLL (prompts included)")(
    _family(_orpo))
register("fastdpo-cpo", workloads=("step",), help="fastdpo.CPO(loss_type='sigmoid'): CPO + chosen NLL")(
    _family(_cpo(beta=BETA)))
register("fastdpo-simpo", workloads=("step",), help="fastdpo.CPO(loss_type='simpo', cpo_alpha=0): SimPO")(
    _family(_cpo(loss_type="simpo", beta=2.0, cpo_alpha=0.0)))
