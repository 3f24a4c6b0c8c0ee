"""The fused head's budgets and buffers: ``DPO(chunk_bytes=, group_bytes=)`` (and the other
families') reach the ops and change no number beyond float rounding; bad budgets are one clear
error; the CPU box follows its documented rule (one L2 cache per thread); large CPU buffers
start on a 2 MiB boundary, advised as transparent huge pages, and hold what a plain buffer
holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from x_transformers import Decoder, TransformerWrapper

import fastdpo.scoring.rows as chunks
from fastdpo import CPO, DPO
from fastdpo.scoring.backends import torch_fold as torch_impl

from helpers import rel_err

B, L, V = 3, 14, 257


def _model(seed: int = 0) -> TransformerWrapper:
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2))


def _batch():
    g = torch.Generator().manual_seed(5)
    pref, unpref = torch.randint(1, V, (B, L), generator=g), torch.randint(1, V, (B, L), generator=g)
    prompt = torch.arange(L)[None] < torch.tensor([[3], [6], [2]])
    return pref, unpref, prompt


def _step(module, batch):
    loss = module(*batch[:2], prompt_mask=batch[2])
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def _rows_seen(monkeypatch):
    """Rows of every head product (``chunks.logits_into``) and of every kept buffer."""
    products, buffers = [], []
    real_into, real_buffer = chunks.logits_into, chunks.rows_buffer

    def into(out, *a, **k):
        products.append(out.shape[0])
        return real_into(out, *a, **k)

    def buffer(rows, *a, **k):
        buffers.append(rows)
        return real_buffer(rows, *a, **k)

    monkeypatch.setattr(chunks, "logits_into", into)
    monkeypatch.setattr(chunks, "rows_buffer", buffer)
    return products, buffers


@pytest.mark.parametrize("group_rows", [None, 7], ids=["default-group", "group-7-rows"])
def test_dpo_budgets_reach_the_pair_op_and_change_no_number(group_rows, monkeypatch):
    batch = _batch()
    default = DPO(_model())
    assert default.route(default.policy_model, "cpu").kind == "dpo_head"
    loss0, grads0 = _step(default, batch)
    chunk = 4 * V * 3  # three rows of float32 logits per product
    group = 4 * V * group_rows if group_rows else None
    tight = DPO(_model(), chunk_bytes=chunk, group_bytes=group)
    products, buffers = _rows_seen(monkeypatch)
    with torch.no_grad():  # scoring alone: every product within the chunk
        torch.testing.assert_close(tight(*batch[:2], prompt_mask=batch[2]), loss0, rtol=1e-6, atol=0)
    assert products and max(products) == 3, products
    products.clear()
    loss1, grads1 = _step(tight, batch)
    if group_rows:
        # a group keeps at most 7 rows (one pair is more: the rest are made again, scored in
        # chunks of 3 rows, differentiated in the kept buffer's 7)
        assert max(buffers) <= group_rows, buffers
        assert 3 in products and max(products) == group_rows, products
    else:  # the batch is one group, kept whole: its products and the reference's take all its rows
        counted = 2 * (B * (L - 1) - int(batch[2].sum()))  # L - 1 targets a sequence, less its prompt's
        assert set(products) == {counted}, products
    assert rel_err(loss1, loss0) < 1e-6
    for g1, g0 in zip(grads1, grads0):
        assert rel_err(g1, g0) < 1e-5  # the weight gradient summed over other chunks: float32 order


def test_a_family_on_the_scores_route_takes_the_chunk_budget(monkeypatch):
    batch = _batch()
    loss0, grads0 = _step(CPO(_model()), batch)
    cpo = CPO(_model(), chunk_bytes=4 * V * 2)
    assert cpo.route(cpo.policy_model, "cpu").kind == "fused"
    products, _ = _rows_seen(monkeypatch)
    loss1, grads1 = _step(cpo, batch)
    assert products and max(products) == 2, products
    assert rel_err(loss1, loss0) < 1e-6
    for g1, g0 in zip(grads1, grads0):
        assert rel_err(g1, g0) < 1e-5


def test_the_scratch_buffer_is_reused_grown_and_remade_for_another_dtype():
    cpu = torch.device("cpu")
    scratch = chunks.Scratch()
    a = scratch.rows(5, 11, torch.float32, cpu)
    assert a.shape == (5, 11) and a.is_contiguous()
    b = scratch.rows(3, 17, torch.float32, cpu)  # 51 <= 55 elements: the same memory
    assert b.shape == (3, 17) and b.data_ptr() == a.data_ptr()
    c = scratch.rows(6, 11, torch.float32, cpu)  # larger: a new buffer of the new size
    assert c.shape == (6, 11) and c.untyped_storage().nbytes() >= 6 * 11 * 4
    d = scratch.rows(2, 11, torch.bfloat16, cpu)
    assert d.dtype == torch.bfloat16 and d.shape == (2, 11)
    assert scratch.rows(2, 11, torch.bfloat16, cpu).data_ptr() == d.data_ptr()


@pytest.mark.parametrize("grad", [True, False], ids=["training", "evaluation"])
def test_a_fused_step_makes_one_logits_buffer(grad, monkeypatch):
    """The reference's chunks, the policy's scoring or kept logits: one buffer per op call
    (the default budgets hold this batch's logits in one chunk and one group)."""
    batch = _batch()
    module = DPO(_model())
    _, buffers = _rows_seen(monkeypatch)
    with torch.set_grad_enabled(grad):
        loss = module(*batch[:2], prompt_mask=batch[2])
    assert loss.requires_grad == grad
    assert len(buffers) == 1, buffers


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "64MiB"])
@pytest.mark.parametrize("name", ["chunk_bytes", "group_bytes"])
def test_a_bad_budget_is_one_clear_error(name, bad):
    with pytest.raises(ValueError, match=f"{name} must be None"):
        DPO(_model(), **{name: bad})


def test_the_box_is_one_l2_cache_per_thread(monkeypatch):
    monkeypatch.setattr(torch_impl, "l2_cache_bytes", lambda: 2 << 20)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch_impl.box_bytes() == 2 << 20
        torch.set_num_threads(2)
        assert torch_impl.box_bytes() == 4 << 20
        torch.set_num_threads(64)
        assert torch_impl.box_bytes() == torch_impl.BOX_BYTES_RANGE[1]
        monkeypatch.setattr(torch_impl, "l2_cache_bytes", lambda: 256 << 10)
        torch.set_num_threads(1)
        assert torch_impl.box_bytes() == torch_impl.BOX_BYTES_RANGE[0]
        monkeypatch.setattr(torch_impl, "BOX_BYTES", 12345)
        assert torch_impl.box_bytes() == 12345
    finally:
        torch.set_num_threads(threads)


def test_this_hosts_l2_size_is_read():
    size = torch_impl.l2_cache_bytes()
    assert 64 << 10 <= size <= 1 << 30, size


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def _vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            if inside:
                break
            inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return fields


def test_a_large_cpu_buffer_is_aligned_and_advised_as_huge_pages():
    rows, v = 300, 32000  # 36.6 MiB of float32
    buf = chunks.rows_buffer(rows, v, torch.float32, torch.device("cpu"))
    assert buf.shape == (rows, v) and buf.dtype == torch.float32 and buf.is_contiguous()
    if chunks._madvise_fn() is None:
        pytest.skip("no madvise here (not Linux)")
    assert buf.data_ptr() % (2 << 20) == 0
    mode = _thp_mode()
    if mode in (None, "never"):
        pytest.skip(f"transparent huge pages are {mode or 'absent'} on this host")
    flags = _vma_flags(buf.data_ptr())
    assert flags, "the buffer's mapping is not in /proc/self/smaps"
    # "hg" in VmFlags: madvise(MADV_HUGEPAGE) took on this mapping
    assert "hg" in flags.get("VmFlags", "").split(), flags.get("VmFlags")
    buf.fill_(1.5)  # writable over its whole length
    assert float(buf.sum()) == pytest.approx(1.5 * rows * v, rel=1e-6)


def test_small_or_disabled_buffers_are_plain(monkeypatch):
    small = chunks.rows_buffer(4, 100, torch.float32, torch.device("cpu"))
    assert small.shape == (4, 100) and small.storage_offset() == 0
    monkeypatch.setattr(chunks, "HUGE_PAGES", False)
    big = chunks.rows_buffer(300, 32000, torch.bfloat16, torch.device("cpu"))
    assert big.shape == (300, 32000) and big.dtype == torch.bfloat16 and big.storage_offset() == 0


def test_the_fused_step_is_the_same_with_and_without_huge_pages(monkeypatch):
    """Buffers over the threshold on both runs (threshold lowered), so the advised path runs."""
    monkeypatch.setattr(chunks, "HUGE_PAGE_MIN_BYTES", 1)
    batch = _batch()
    loss1, grads1 = _step(DPO(_model()), batch)
    monkeypatch.setattr(chunks, "HUGE_PAGES", False)
    loss0, grads0 = _step(DPO(_model()), batch)
    assert torch.equal(loss1, loss0)
    for g1, g0 in zip(grads1, grads0):
        assert torch.equal(g1, g0)
