"""DPO under data parallelism: DistributedDataParallel and FSDP2, two CPU processes, gloo.

One job of two processes (spawned with torch.multiprocessing, MASTER_ADDR=127.0.0.1 and a free
port, bounded by a timeout) runs every scenario and saves what it saw; the tests below check
it against one process on the whole batch.  Facts established here are written up in
docs/distributed.md.

Each rank gets half the pairs.  DDP (and FSDP2) average gradients over ranks and DPO's loss
is a mean over pairs, so with equal halves the averaged gradient is the full batch's.
"""

from __future__ import annotations

import importlib.util
import os
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from helpers import spawned_job, tiny_transformer

WORLD = 2
B, L, V = 4, 8, 32  # 4 pairs: 2 per rank
HEADS = ("fused", "logits", "packed")  # packed: the default head, pairs packed (packing="batch")
# DDP runs each head on an x-transformers model and on a Hugging Face Llama (when installed)
FAMILIES = ("x-transformers", "hf") if importlib.util.find_spec("transformers") else ("x-transformers",)
DDP_CASES = [f"{family}-{head}" for family in FAMILIES for head in HEADS]
TIMEOUT_S = 240  # two fresh interpreters importing torch on a shared 2-core machine

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


# ----------------------------------------------------------------------------- shared setup


def make_model(family: str, tied: bool = False) -> torch.nn.Module:
    """``"hf"``: a Llama (a class fastdpo's HEAD_RULES list); ``"hfsub"``: the same weights in a
    subclass, whose head fastdpo infers and checks on the first call (under FSDP2 here)."""
    torch.manual_seed(0)
    if family in ("hf", "hfsub"):
        from transformers import LlamaConfig, LlamaForCausalLM

        if family == "hfsub":
            LlamaForCausalLM = type("InferredLlama", (LlamaForCausalLM,), {})

        config = LlamaConfig(
            vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=None,
            eos_token_id=None, tie_word_embeddings=tied,
        )
        return LlamaForCausalLM(config)
    return tiny_transformer(V, max_seq_len=16, dim=16, depth=2, heads=2, seed=0, tie=tied)


def make_dpo(head: str, family: str = "x-transformers", tied: bool = False):
    """The same DPO on every rank and in the single-process reference: seeded weights, the
    policy moved away from the reference so the loss has a gradient."""
    from fastdpo import DPO

    packing = "batch" if head == "packed" else "none"
    dpo = DPO(make_model(family, tied), pad_id=0, head="auto" if head == "packed" else head, packing=packing)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dpo.policy_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return dpo


def make_batch():
    g = torch.Generator().manual_seed(2)
    pref = torch.randint(1, V, (B, L), generator=g)
    unpref = torch.randint(1, V, (B, L), generator=g)
    prompt_mask = torch.arange(L)[None] < torch.tensor([[2], [3], [1], [4]])
    unpref[prompt_mask] = pref[prompt_mask]
    pref[1, -2:] = 0  # some padding
    unpref[2, -3:] = 0
    return pref, unpref, prompt_mask


def policy_grads(dpo) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in dpo.policy_model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):  # an FSDP2 DTensor shard
            g = g.full_tensor()
        out[name] = None if g is None else g.detach().clone()
    return out


# ----------------------------------------------------------------------------- the worker


def _ddp_scenario(rank: int, case: str, res: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    family, head = case.rsplit("-", 1)
    dpo = make_dpo(head, family)
    pref, unpref, prompt_mask = make_batch()
    half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    mine = (pref[half], unpref[half])
    pm = prompt_mask[half]

    res["named_parameters_include_ref"] = any(n.startswith("ref_model.") for n, _ in dpo.named_parameters())
    res["num_policy_params"] = len(list(dpo.parameters()))
    res["num_named_params"] = len(list(dpo.named_parameters()))
    # Make rank 1's frozen reference differ, to see whether DDP's construction copies it.
    if rank == 1:
        with torch.no_grad():
            next(dpo.ref_model.parameters()).add_(1.0)
    ddp = DDP(dpo)  # default find_unused_parameters=False
    res["num_ddp_params"] = len(list(ddp.parameters()))
    res["ref_after_wrap"] = {k: v.clone() for k, v in dpo.ref_model.state_dict().items()}

    # 1. a plain step
    dpo.policy_model.zero_grad(set_to_none=True)
    ddp(*mine, prompt_mask=pm).backward()
    res["grads"] = policy_grads(dpo)

    # 2. precomputed reference scores: this rank's half, then passed back in
    w, l = ddp.module.reference_scores(*mine, prompt_mask=pm)
    dpo.policy_model.zero_grad(set_to_none=True)
    ddp(*mine, prompt_mask=pm, ref_preferred_logprob=w, ref_unpreferred_logprob=l).backward()
    res["grads_precomputed"] = policy_grads(dpo)
    res["ref_scores"] = (w, l)

    # 3. an optimizer step and two more iterations: without find_unused_parameters, DDP
    # raises on the next forward if any parameter it tracks got no gradient
    opt = torch.optim.SGD(dpo.parameters(), lr=0.1)
    for _ in range(2):
        opt.step()
        opt.zero_grad(set_to_none=True)
        ddp(*mine, prompt_mask=pm).backward()
    res["grads_step3"] = policy_grads(dpo)

    res["ref_after_training"] = {k: v.clone() for k, v in dpo.ref_model.state_dict().items()}
    res["ref_requires_grad"] = [p.requires_grad for p in dpo.ref_model.parameters()]
    res["ref_grads"] = [p.grad for p in dpo.ref_model.parameters()]


# FSDP2 cases: "<family>-<head>[-tied][-mp]" (mp: MixedPrecisionPolicy(param_dtype=bf16,
# reduce_dtype=fp32)).
FSDP_CASES = ["x-transformers-logits", "x-transformers-auto", "x-transformers-fused", "x-transformers-auto-tied",
              "x-transformers-logits-mp", "x-transformers-auto-mp", "x-transformers-logits-tied-mp",
              "x-transformers-auto-tied-mp", "x-transformers-auto-reshard", "x-transformers-packed"]
if "hf" in FAMILIES:
    FSDP_CASES += ["hfsub-auto"]  # an inferred head, checked on its first call, under FSDP2
    FSDP_CASES += ["hf-auto", "hf-auto-tied", "hf-auto-reshard", "hf-logits-mp", "hf-auto-mp", "hf-packed"]


def parse_case(case: str) -> tuple[str, str, bool, bool]:
    """(family, head, tied, mixed precision) of an FSDP case (reshard: the policy's root
    reshards after forward too, so its head weight is a DTensor when the head runs)."""
    family = next((f for f in ("hfsub", "hf") if case.startswith(f + "-")), "x-transformers")
    rest = case[len(family) + 1:].split("-")
    return family, rest[0], "tied" in rest, "mp" in rest


def shard(model: torch.nn.Module, family: str, mesh, *, frozen: bool, mp: bool, reshard: bool = False) -> None:
    """docs/distributed.md's recipe: the blocks, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = dict(mesh=mesh)
    if mp:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if family in ("hf", "hfsub"):
        for layer in model.model.layers:
            fully_shard(layer, **kw)
    else:
        # x-transformers' layers are ModuleLists (no forward): shard each block inside them
        for layer in model.attn_layers.layers:
            fully_shard(layer[1], **kw)
    # A root keeps its parameters unsharded after forward by default (reshard_after_forward
    # None -> False at the root), expecting backward to reshard them; the reference never
    # runs backward, so its embedding and head would stay gathered: reshard explicitly.
    fully_shard(model, **kw, **({"reshard_after_forward": True} if frozen or reshard else {}))


def _fsdp_scenario(rank: int, case: str, res: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    family, head, tied, mp = parse_case(case)
    dpo = make_dpo(head, family, tied)  # DPO first: its reference is a deep copy of the unsharded model
    pref, unpref, prompt_mask = make_batch()
    half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    shard(dpo.policy_model, family, mesh, frozen=False, mp=mp, reshard=case.endswith("-reshard"))
    shard(dpo.ref_model, family, mesh, frozen=True, mp=mp)  # the frozen reference shards too
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for step in range(2):  # the second step: the routes are cached, the weights swapped
                dpo.policy_model.zero_grad(set_to_none=True)
                loss = dpo(pref[half], unpref[half], prompt_mask=prompt_mask[half])
                loss.backward()
        res["warnings"] = [str(w.message) for w in seen]
        res["outcome"] = "ok"
        res["loss"] = loss.detach().float()
        res["route"] = dpo.route(dpo.policy_model, "cpu").kind
        res["ref_route"] = dpo.route(dpo.ref_model, "cpu").kind
        res["checked"] = sorted(verdict.why_not for _, verdict in dpo.scorer.checked.values())  # inferred heads' checks
        res["grads"] = policy_grads(dpo)
        res["ref_is_sharded"] = all(hasattr(p, "full_tensor") for p in dpo.ref_model.parameters())
        res["policy_is_sharded"] = all(hasattr(p, "full_tensor") for p in dpo.policy_model.parameters())
    except Exception as e:  # recorded for the docs: the tests say what is expected
        res["outcome"] = f"{type(e).__name__}: {e}"
        res["where"] = traceback.format_exc(limit=-3)


# The reference-free families on DPO's machinery: x-transformers, fused head ("scores" route).
FAMILY_CASES = ("orpo", "cpo-simpo")


def make_family(case: str):
    """The same ORPO or CPO on every rank and in the single-process reference (seeded weights,
    moved off their init as make_dpo does)."""
    from fastdpo import CPO, ORPO

    model = make_model("x-transformers")
    module = ORPO(model, pad_id=0) if case == "orpo" else CPO(model, pad_id=0, loss_type="simpo", beta=2.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.policy_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def _family_scenario(rank: int, case: str, res: dict, fsdp: bool) -> None:
    """One step under DDP, then (when FSDP2 imports) one under fully_shard, on this rank's half."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    pref, unpref, prompt_mask = make_batch()
    half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    module = make_family(case)
    ddp = DDP(module)  # kept alive through backward: the reducer's all-reduce hooks die with it
    ddp(pref[half], unpref[half], prompt_mask=prompt_mask[half]).backward()
    res["ddp_grads"] = policy_grads(module)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        module = make_family(case)
        shard(module.policy_model, "x-transformers", init_device_mesh("cpu", (WORLD,)), frozen=False, mp=False)
        module(pref[half], unpref[half], prompt_mask=prompt_mask[half]).backward()
        res["fsdp_grads"] = policy_grads(module)
        res["fsdp_route"] = module.route(module.policy_model, "cpu").kind


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two processes on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {"ddp": {}, "fsdp": {}}
    try:
        for case in DDP_CASES:
            results["ddp"][case] = {}
            _ddp_scenario(rank, case, results["ddp"][case])
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401

            results["fsdp_import"] = "ok"
        except ImportError as e:
            results["fsdp_import"] = f"ImportError: {e}"
        if results["fsdp_import"] == "ok":
            for case in FSDP_CASES:
                results["fsdp"][case] = {}
                _fsdp_scenario(rank, case, results["fsdp"][case])
        results["families"] = {}
        for case in FAMILY_CASES:
            results["families"][case] = {}
            _family_scenario(rank, case, results["families"][case], fsdp=results["fsdp_import"] == "ok")
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the two-process job once; return (rank 0 results, rank 1 results)."""
    return spawned_job(_worker, WORLD, tmp_path_factory.mktemp("dist"), TIMEOUT_S)


def full_batch_grads(head: str, family: str = "x-transformers", tied: bool = False) -> dict[str, torch.Tensor]:
    """One process, the whole batch, unpacked: the gradient every rank must end up with."""
    dpo = make_dpo("fused" if head == "packed" else head, family, tied)
    pref, unpref, prompt_mask = make_batch()
    dpo(pref, unpref, prompt_mask=prompt_mask).backward()
    return policy_grads(dpo)


def assert_grads_match(got: dict, want: dict, what: str, tol: float = 1e-5) -> None:
    # Two half-batch means averaged vs one full-batch mean: the same sum in another order,
    # float32 rounding (test_dpo's parity tolerance).
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None, (what, name, "no gradient")
        err = (got[name].double() - want[name].double()).norm() / want[name].double().norm()
        assert err <= tol, (what, name, err.item())


# ----------------------------------------------------------------------------- DDP


@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_gradients_match_one_process_on_the_whole_batch(job, case):
    want = full_batch_grads(*reversed(case.rsplit("-", 1)))
    for rank, res in enumerate(job):
        assert_grads_match(res["ddp"][case]["grads"], want, f"rank {rank}")
    # all-reduce leaves the same bits on every rank
    g0, g1 = job[0]["ddp"][case]["grads"], job[1]["ddp"][case]["grads"]
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_precomputed_reference_scores(job, case):
    """reference_scores on each rank's half, passed back in: the very same gradients."""
    for res in job:
        r = res["ddp"][case]
        assert all(torch.equal(r["grads_precomputed"][n], r["grads"][n]) for n in r["grads"])
    # and they are the full batch's reference scores, split by rank
    dpo = make_dpo(*reversed(case.rsplit("-", 1)))
    pref, unpref, prompt_mask = make_batch()
    w, l = dpo.reference_scores(pref, unpref, prompt_mask=prompt_mask)
    got_w = torch.cat([res["ddp"][case]["ref_scores"][0] for res in job])
    got_l = torch.cat([res["ddp"][case]["ref_scores"][1] for res in job])
    torch.testing.assert_close(got_w, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_l, l, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_needs_no_find_unused_parameters(job, case):
    """Every policy parameter gets a gradient on both routes (the fused route reaches the
    head weight through its own autograd Function, not to_logits' forward), so the default
    find_unused_parameters=False runs iteration after iteration, ranks in lockstep."""
    g0, g1 = job[0]["ddp"][case]["grads_step3"], job[1]["ddp"][case]["grads_step3"]
    assert all(g is not None for g in g0.values())
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


@pytest.mark.parametrize("case", DDP_CASES)
def test_ddp_reference_model_frozen_and_not_reduced(job, case):
    """The reference takes no gradient and is never all-reduced (DDP's reducer only tracks
    parameters with requires_grad), and training leaves it bit-for-bit unchanged.  But DPO
    overrides parameters() only, so named_parameters() -- what DDP reads -- includes it, and
    DDP's construction broadcasts it from rank 0 with the policy (once)."""
    for res in job:
        r = res["ddp"][case]
        assert not any(r["ref_requires_grad"]) and all(g is None for g in r["ref_grads"])
        for k, v in r["ref_after_wrap"].items():
            assert torch.equal(r["ref_after_training"][k], v), k
        assert r["named_parameters_include_ref"]
        assert r["num_named_params"] > r["num_policy_params"]
        # DDP.parameters() is nn.Module's: the reference's frozen parameters too -- build the
        # optimizer from dpo.parameters() (DDP(...).module.parameters()).
        assert r["num_ddp_params"] == r["num_named_params"]
    # rank 1's reference was perturbed before wrapping; DDP overwrote it with rank 0's
    a, b = job[0]["ddp"][case]["ref_after_wrap"], job[1]["ddp"][case]["ref_after_wrap"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    untouched = make_dpo(*reversed(case.rsplit("-", 1))).ref_model.state_dict()
    assert all(torch.equal(a[k], untouched[k]) for k in a)


# ----------------------------------------------------------------------------- FSDP2


def test_fsdp2_is_importable_on_cpu(job):
    assert job[0]["fsdp_import"] == "ok", job[0]["fsdp_import"]


def grad_errors(got: dict, want: dict) -> dict[str, float]:
    assert got.keys() == want.keys()
    return {n: ((got[n].double() - want[n].double()).norm() / want[n].double().norm()).item() for n in want}


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp2_matches_one_process(job, case):
    """fully_shard on CPU with gloo, policy and frozen reference both sharded (the docs'
    recipe), two steps: every gradient (gathered with full_tensor()) equals one process on the
    whole batch, and after the step nothing is left gathered.  The default head takes the
    fused route (the head weight gathered per call, its gradient reduce-scattered by FSDP2 or
    through DTensor's autograd).  Under the bf16 mixed-precision policy the bodies run in
    bf16: the fused route's gradients must be as close to the float32 process as the logits
    route's are (the same case with head="logits"), which is a few percent."""
    family, head, tied, mp = parse_case(case)
    want = full_batch_grads(head, family, tied)
    dpo = make_dpo(head, family, tied)
    full_loss = dpo(*make_batch()[:2], prompt_mask=make_batch()[2]).item()
    mean_loss = sum(res["fsdp"][case]["loss"].item() for res in job if "loss" in res["fsdp"][case]) / WORLD
    assert mean_loss == pytest.approx(full_loss, rel=2e-2 if mp else 1e-6, abs=1e-6)
    for rank, res in enumerate(job):
        r = res["fsdp"][case]
        assert r["outcome"] == "ok", r.get("where", r["outcome"])
        assert r["route"] == r["ref_route"] == ("logits" if head == "logits" else "dpo_head")
        assert r["checked"] == (["", ""] if family == "hfsub" else [])  # policy and reference, passed
        assert not [w for w in r["warnings"] if "logits" in w]  # no fallback warning
        assert r["ref_is_sharded"] and r["policy_is_sharded"]  # after the step: nothing left gathered
        if not mp:
            assert_grads_match(r["grads"], want, f"fsdp {case} rank {rank}")
            continue
        errs = grad_errors(r["grads"], want)
        assert max(errs.values()) < 0.05, (case, max(errs.values()))  # bf16 bodies, not garbage
        if head != "logits":
            twin = grad_errors(res["fsdp"][case.replace("-auto", "-logits")]["grads"], want)
            for n in errs:
                assert errs[n] <= 1.1 * twin[n] + 1e-3, (case, n, errs[n], twin[n])


def test_fsdp2_ranks_agree(job):
    for case in FSDP_CASES:
        g0, g1 = job[0]["fsdp"][case]["grads"], job[1]["fsdp"][case]["grads"]
        assert all(torch.equal(g0[n], g1[n]) for n in g0), case


# ----------------------------------------------------------------------------- ORPO, CPO


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_families_under_ddp_and_fsdp2(job, case):
    """ORPO and CPO reuse DPO's machinery under data parallelism: each rank's loss is its own
    half's (the NLL a token mean over that half, as TRL's per-process loss), and DDP and
    FSDP2 average the gradients: the mean of one process's gradients on each half, on every
    rank, bit-for-bit the same on both."""
    pref, unpref, prompt_mask = make_batch()
    want = {}
    for rank in range(WORLD):
        half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        module = make_family(case)
        module(pref[half], unpref[half], prompt_mask=prompt_mask[half]).backward()
        for name, g in policy_grads(module).items():
            want[name] = want.get(name, 0) + g / WORLD
    for key in ("ddp_grads", "fsdp_grads"):
        for rank, res in enumerate(job):
            assert_grads_match(res["families"][case][key], want, f"{key} {case} rank {rank}")
        g0, g1 = (res["families"][case][key] for res in job)
        assert all(torch.equal(g0[n], g1[n]) for n in g0), key
    assert all(res["families"][case]["fsdp_route"] == "fused" for res in job)
