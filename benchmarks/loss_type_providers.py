"""Bench providers for TRL's other DPO loss types (``fastdpo bench --provider-module``).

Each is ``fastdpo.DPO`` (impl="torch", the default fused head) with one loss option, to time
against ``fastdpo-torch`` (sigmoid DPO) in the same run::

    python -m fastdpo.cli bench --size medium --workload step --mode forward+backward \\
        --provider-module benchmarks/loss_type_providers.py \\
        --providers fastdpo-torch,fastdpo-aot,fastdpo-discopop,fastdpo-sft,fastdpo-forward_kl

``aot`` sorts the batch's margins: the pair op takes the batch as one group (logits beyond its
keep budget recomputed); ``fastdpo-aot-scores`` runs it on the ``"scores"`` route instead (the
policy scored whole by ``linear_sequence_logprobs``, then the loss), for comparison.
"""

from __future__ import annotations

from fastdpo import bench
from fastdpo.bench.inputs import _dpo

LOSSES = {
    "aot": dict(loss_type="aot"),
    "aot_unpaired": dict(loss_type="aot_unpaired"),
    "discopop": dict(loss_type="discopop"),
    "sft": dict(loss_type=["sigmoid", "sft"]),
    "sft-sum": dict(loss_type=["sigmoid", "sft"], logprob_reduction="sum", mask_alignment="target"),
    "forward_kl": dict(f_divergence_type="forward_kl"),
    "alpha_divergence": dict(f_divergence_type="alpha_divergence"),
}


def _provider(options: dict, scores_route: bool = False):
    def build(workload: str, mode: str, cfg):
        from fastdpo import DPO

        batch = bench.make_batch(cfg)
        dpo = _dpo(DPO, cfg, impl="torch", **options)
        if scores_route:  # before the first call decides the route
            dpo.scorer.independent_pairs = False
        return bench.make_step(lambda: dpo(batch.pref, batch.unpref, **batch.dpo_kwargs), mode, dpo.parameters())

    return build


for _name, _options in LOSSES.items():
    bench.register(f"fastdpo-{_name}", workloads=("step",), same_loss_as=_options,
                   help=f"fastdpo.DPO(impl='torch', {_options})")(_provider(_options))


bench.register("fastdpo-aot-scores", workloads=("step",), same_loss_as=LOSSES["aot"],
               help="fastdpo.DPO(impl='torch', loss_type='aot') on the scores route")(_provider(LOSSES["aot"], True))
