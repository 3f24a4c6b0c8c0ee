"""Bench providers for LD-DPO (``ld_alpha``) and WPO (``use_weighting``), beside fastdpo's
plain step, for ``fastdpo bench --provider-module``:

    fastdpo bench --size medium --workload step --mode forward+backward \
        --provider-module benchmarks/weighting_providers.py \
        --providers fastdpo-torch,fastdpo-wpo,fastdpo-ld,fastdpo-ld-wpo

Each is ``fastdpo.DPO`` on the bench's models and batch (the default route: the fused head),
with the option added; the issue's goal is each step within 5% of the plain one's.
"""

from __future__ import annotations

from fastdpo.bench.inputs import _dpo, make_batch, make_step
from fastdpo.bench.registry import register

OPTIONS = {
    "wpo": dict(use_weighting=True),
    "ld": dict(ld_alpha=0.5),
    "ld-wpo": dict(ld_alpha=0.5, use_weighting=True),
}


def _build(options: dict):
    def build(workload, mode, cfg):
        from fastdpo import DPO

        bt = make_batch(cfg)
        dpo = _dpo(DPO, cfg, impl="torch" if not cfg.device.startswith("cuda") else "auto", **options)
        return make_step(lambda: dpo(bt.pref, bt.unpref, **bt.dpo_kwargs), mode, dpo.parameters())

    return build


for _name, _options in OPTIONS.items():
    register(f"fastdpo-{_name}", workloads=("step",), help=f"fastdpo.DPO({_options})")(_build(_options))
