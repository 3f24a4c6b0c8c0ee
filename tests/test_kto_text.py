"""TokenizedKTODataset.from_records (fastdpo/data/kto_text.py) against TRL 1.16's own KTO data path.

TRL's side is its real code, called unbound on a stub trainer: ``KTOTrainer._prepare_dataset``
(prompt extraction and unpairing of preference pairs, EOS, its tokenize function, the prompt
boundary, the ``max_length`` drop, the KL completions it adds per batch of
``per_device_train_batch_size`` rows) on a ``datasets.Dataset`` of the same records, then
``DataCollatorForUnpairedPreference`` on its rows, ``B`` at a time, as its sequential sampler
batches them.  The stub carries what the method reads (``_tokenizer``, ``calculate_KL``, the two
weights; ``args`` with ``dataset_num_proc``, ``max_length``, ``per_device_train_batch_size``), and
the tokenizer gets the pad token ``KTOTrainer.__init__`` gives it (its EOS token when it has none).

The tokenizers and most records are tests/test_text.py's (no download).  Each fixture's rows
(``prompt_ids``, ``completion_ids``, ``label``) and every batch as ``KTO.forward`` takes it must
equal TRL's exactly: ``input_ids = seq``, ``attention_mask = seq_mask``, ``completion_mask =
~prompt_mask & seq_mask``, and the same for the ``KL_`` sequences; then ``fastdpo.KTO`` on a
tiny Llama gives TRL's ``_compute_loss`` on TRL's batch (tests/test_kto.py's harness).  Controls
show that a deviation (no EOS, the boundary after the tokenized prompt, chosen and rejected
interleaved, KL sequences not rotated or rotated the other way) fails the comparison.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

import fastdpo.data.kto_text  # noqa: E402
from fastdpo import KTO, KTODataset, TokenizedKTODataset  # noqa: E402

from test_kto import assert_same, logits_of, ours_step, perturb, reference_step, trl_kto  # noqa: E402
from test_text import (  # noqa: E402
    CONVERSATION, IMPLICIT, IMPLICIT_CONVERSATION, PLAIN, SEAM, TOOLS, WEATHER, assistant, llama, make_tokenizer, user,
)
from test_text import perturb as perturb_frozen  # noqa: E402  (every parameter, the frozen reference's too)

B = 3  # TRL's per_device_train_batch_size: odd, so the KL rotation's direction shows


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_eos_pad():
    """BOS first, no pad token: batches are padded with the EOS id."""
    return make_tokenizer(bos=True, pad=False)


# ----------------------------------------------------------------------------- records

UNPAIRED_PLAIN = [
    dict(prompt="The sky is", completion=" blue.", label=True),
    dict(prompt="What color is the sky?", completion=" It is blue.</s>", label=True),  # EOS already there
    dict(prompt="Where is the sun? In the", completion=" sea, the sun is in the sea.", label=False),
    dict(prompt="", completion="Say hello to the help desk.", label=False),  # no prompt text
    dict(prompt="The weather in Paris is", completion=" sunny.", label=True),
]
# " hel" + "lo" is one token " hello", " s" "k" + "y" is " sky": the prompt is cut at the seam.
UNPAIRED_SEAM = [
    dict(prompt="Say hel", completion="lo to the help desk.", label=True),
    dict(prompt="Where is the sun? In the sk", completion="y, the sun is blue.", label=False),
    dict(prompt="The weather in Paris is", completion=" blue.", label=False),
    dict(prompt="Say hel", completion="p me.", label=True),
]
UNPAIRED_CONVERSATION = [
    dict(prompt=[{"role": "system", "content": "Answer briefly."}, user("What color is the sky?")],
         completion=[assistant("It is blue.")], label=True),
    dict(prompt=[user("Where is the sun?"), assistant("In the sky."), user("And the sea?")],
         completion=[assistant("Green.")], label=False),
    dict(prompt=[user("Say hello to the help desk.")], completion=[assistant("hello help desk")], label=True),
    dict(prompt=[user("Is the sky blue?")], completion=[assistant("The weather in Paris is sunny.")], label=False),
]
UNPAIRED_TOOLS = [
    dict(prompt=TOOLS[0]["prompt"], completion=TOOLS[0]["chosen"], label=True, tools=json.dumps(WEATHER),
         chat_template_kwargs={"think": True}),
    dict(prompt=TOOLS[1]["prompt"], completion=TOOLS[1]["rejected"], label=False, tools=json.dumps(WEATHER),
         chat_template_kwargs={"think": False}),
    dict(prompt=[user("What is the weather in Paris?")], completion=[assistant("It is sunny.")], label=True,
         tools=json.dumps(WEATHER), chat_template_kwargs={"think": True}),
]
FIXTURES = {
    "plain": UNPAIRED_PLAIN, "seam": UNPAIRED_SEAM, "conversation": UNPAIRED_CONVERSATION, "tools": UNPAIRED_TOOLS,
    # preference pairs, unpaired by TRL (and by fastdpo): with a prompt, without (extracted), messages, tools
    "pairs": PLAIN + SEAM, "pairs_implicit": IMPLICIT, "pairs_conversation": CONVERSATION,
    "pairs_implicit_conversation": IMPLICIT_CONVERSATION, "pairs_tools": TOOLS,
}


# ----------------------------------------------------------------------------- TRL's side


def trl_prepare(records, tokenizer, max_length=None, *, kl=True, num_proc=None, source=None):
    """TRL 1.16's rows (``KTOTrainer._prepare_dataset``, KL completions for batches of ``B``)
    and its batches (``DataCollatorForUnpairedPreference`` on rows ``B`` at a time)."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:  # KTOTrainer.__init__, before it prepares the datasets
        tokenizer.pad_token = tokenizer.eos_token
    trainer = types.SimpleNamespace(_tokenizer=tokenizer, calculate_KL=kl, desirable_weight=1.0,
                                    undesirable_weight=1.0)
    args = types.SimpleNamespace(dataset_num_proc=num_proc, max_length=max_length, per_device_train_batch_size=B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = KTOTrainer._prepare_dataset(trainer, source or datasets.Dataset.from_list(records), tokenizer,
                                               args, "train")
    rows = [prepared[i] for i in range(len(prepared))]
    collator = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    return rows, [collator(rows[k: k + B]) for k in range(0, len(rows), B)]


def from_records(records, tokenizer, **kw) -> TokenizedKTODataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the boundary and drop notices; tested on their own
        return TokenizedKTODataset.from_records(records, tokenizer, **kw)


def batches(ds) -> list[dict]:
    """``ds``'s batches of ``B`` items in order, as a DataLoader without shuffling makes them."""
    return [ds.collate([ds[i] for i in range(k, min(k + B, len(ds)))]) for k in range(0, len(ds), B)]


def assert_rows_equal_trls(ds: TokenizedKTODataset, rows):
    assert len(ds) == len(rows)
    for i, row in enumerate(rows):
        prompt, completion, label = ds[i]
        assert prompt.tolist() == row["prompt_ids"], (i, prompt.tolist(), row["prompt_ids"])
        assert completion.tolist() == row["completion_ids"], (i, completion.tolist(), row["completion_ids"])
        assert label.dtype == torch.bool and bool(label) == row["label"], i


def assert_batch_equals_trls(ours: dict, trl: dict):
    """One batch, id for id and mask for mask, the KL sequences' too (when TRL has them)."""
    kl = "KL_input_ids" in trl
    assert set(ours) == {"seq", "prompt_mask", "seq_mask", "label"} | (
        {"kl_seq", "kl_prompt_mask", "kl_seq_mask"} if kl else set())
    for prefix, own in (("", ""), ("KL_", "kl_"))[: 1 + kl]:
        seq, prompt, real = ours[own + "seq"], ours[own + "prompt_mask"], ours[own + "seq_mask"]
        assert seq.dtype == torch.long and prompt.dtype == real.dtype == torch.bool
        assert torch.equal(seq, trl[prefix + "input_ids"]), (prefix, seq, trl[prefix + "input_ids"])
        assert torch.equal(real.long(), trl[prefix + "attention_mask"]), prefix
        assert torch.equal((~prompt & real).long(), trl[prefix + "completion_mask"]), prefix
        assert not (prompt & ~real).any()
    assert ours["label"].dtype == torch.bool and torch.equal(ours["label"], trl["label"])


def assert_equals_trl(ds, rows, trl_batches):
    assert_rows_equal_trls(ds, rows)
    ours = batches(ds)
    assert len(ours) == len(trl_batches)
    for o, t in zip(ours, trl_batches):
        assert_batch_equals_trls(o, t)


def truncating_max_length(rows) -> int:
    """The largest max_length that cuts a row it keeps (its prompt shorter than max_length)."""
    spans = [(len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r["completion_ids"])) for r in rows]
    return next(m for m in range(max(w for _, w in spans), 1, -1) if any(p < m < w for p, w in spans))


# ----------------------------------------------------------------------------- exactly TRL's


@pytest.mark.parametrize("name", list(FIXTURES))
def test_rows_and_batches_equal_trls(name, tok, tok_eos_pad):
    """Untruncated, and with a max_length that cuts (and may drop): rows, then each batch of B
    (the last one short) with its KL sequences, equal TRL's."""
    records = FIXTURES[name]
    paired = "chosen" in records[0]
    for tokenizer in (tok, tok_eos_pad):
        full, _ = trl_prepare(records, tokenizer)
        cut = truncating_max_length(full)
        for max_length in (None, cut):
            rows, trl_batches = trl_prepare(records, tokenizer, max_length)
            ds = from_records(records, tokenizer, max_length=max_length)
            assert isinstance(ds, KTODataset)
            assert ds.pad_id == (tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id)
            assert_equals_trl(ds, rows, trl_batches)
            if max_length is None:  # a pair's chosen and rejected, each of the records once
                n = len(records)
                assert ds.indices == (list(range(n)) * 2 if paired else list(range(n)))
            else:  # the case truncates
                lengths = torch.cat([b["attention_mask"].sum(1) for b in trl_batches])
                assert lengths.max() == max_length
                assert (lengths < torch.tensor([len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows])).any()


def test_max_length_drops_what_trl_drops(tok):
    rows_full, _ = trl_prepare(UNPAIRED_CONVERSATION, tok)
    prompts = [len(r["prompt_ids"]) for r in rows_full]
    max_length = sorted(prompts)[1]  # drops the rows whose prompt has that many tokens or more
    rows, trl_batches = trl_prepare(UNPAIRED_CONVERSATION, tok, max_length)
    assert 0 < len(rows) < len(rows_full)
    with pytest.warns(UserWarning, match=rf"max_length={max_length} drops {len(rows_full) - len(rows)} of "
                                         rf"{len(rows_full)} completions"):
        ds = TokenizedKTODataset.from_records(UNPAIRED_CONVERSATION, tok, max_length=max_length)
    assert ds.indices == [i for i, p in enumerate(prompts) if p < max_length]
    assert_equals_trl(ds, rows, trl_batches)
    with pytest.raises(ValueError, match=r"max_length=3 drops all 10 completions: each prompt alone"):
        TokenizedKTODataset.from_records(PLAIN + [PLAIN[0]], tok, max_length=3)
    assert trl_prepare(PLAIN + [PLAIN[0]], tok, 3)[0] == []  # TRL drops them all too


def test_pairs_unpair_in_trls_order_past_one_chunk(tok_eos_pad):
    """TRL unpairs in ``datasets.map`` batches of 1000 records: each batch's chosen completions,
    then its rejected ones; fastdpo lists them in the same order past the first 1000."""
    records = PLAIN * 251  # 1004 records, 2008 completions
    rows, trl_batches = trl_prepare(records, tok_eos_pad)
    ds = from_records(records, tok_eos_pad)
    assert_equals_trl(ds, rows, trl_batches)
    assert ds.indices == [*range(1000), *range(1000), *range(1000, 1004), *range(1000, 1004)]


def test_dataloader_batches_and_no_kl_equal_trls(tok_eos_pad):
    """Through a DataLoader without shuffling (TRL's sequential sampler), batch by batch; and
    ``kl=False`` (``apo_zero_unpaired``) gives TRL's batches without KL sequences."""
    records = UNPAIRED_PLAIN + UNPAIRED_SEAM[:3]  # 8: batches of 3, 3 and 2
    ds = from_records(records, tok_eos_pad, max_length=12)
    _, trl_batches = trl_prepare(records, tok_eos_pad, 12)
    loader = torch.utils.data.DataLoader(ds, batch_size=B, collate_fn=ds.collate)
    got = list(loader)
    assert len(got) == len(trl_batches) == 3 and len(got[-1]["label"]) == 2
    for o, t in zip(got, trl_batches):
        assert_batch_equals_trls(o, t)
    rows, trl_batches = trl_prepare(records, tok_eos_pad, 12, kl=False)
    assert "KL_completion_ids" not in rows[0]
    assert_equals_trl(from_records(records, tok_eos_pad, max_length=12, kl=False), rows, trl_batches)


def test_other_record_sources(tok, tmp_path):
    """A JSON Lines file and a datasets.Dataset (in parallel too) give the list's rows; pairs in
    a Dataset mapped by 2 processes are unpaired per process, as TRL with dataset_num_proc=2."""
    want = from_records(UNPAIRED_CONVERSATION * 2, tok, max_length=20)
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in UNPAIRED_CONVERSATION * 2))
    for got in (from_records(path, tok, max_length=20),
                from_records(datasets.Dataset.from_list(UNPAIRED_CONVERSATION * 2), tok, max_length=20, num_proc=2)):
        assert got.indices == want.indices and len(got) == len(want)
        for i in range(len(want)):
            assert all(torch.equal(a, b) for a, b in zip(got[i], want[i])), i
    records = PLAIN + SEAM  # 7 pairs: 2 processes take records 0-3 and 4-6
    rows, _ = trl_prepare(records, tok, num_proc=2)
    ds = from_records(datasets.Dataset.from_list(records), tok, num_proc=2)
    assert_rows_equal_trls(ds, rows)
    assert ds.indices == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 4, 5, 6]
    assert from_records(records, tok).indices != ds.indices  # (a list: one chunk)


def test_tools_and_template_arguments_equal_a_column(tok):
    bare = [{k: v for k, v in r.items() if k not in ("tools", "chat_template_kwargs")} for r in UNPAIRED_TOOLS]
    rows, trl_batches = trl_prepare([dict(r, tools=WEATHER, chat_template_kwargs={"think": True}) for r in bare], tok)
    assert_equals_trl(from_records(bare, tok, tools=WEATHER, chat_template_kwargs={"think": True}), rows, trl_batches)
    plain_rows, _ = trl_prepare(bare, tok)
    assert [r["prompt_ids"] for r in plain_rows] != [r["prompt_ids"] for r in rows]  # (they change the ids)


def test_seam_warning_names_the_first_record(tok):
    records = [UNPAIRED_SEAM[2], UNPAIRED_SEAM[0], UNPAIRED_SEAM[1], UNPAIRED_SEAM[3]]  # the first one merges nothing
    with pytest.warns(UserWarning, match=r"3 of 4 completions \(the first records\[1\]\): the tokenized prompt is "
                                         r"not a prefix") as record:
        TokenizedKTODataset.from_records(records, tok)
    assert len(record) == 1


# ----------------------------------------------------------------------------- controls


def test_controls_a_deviation_fails_the_comparison(tok, monkeypatch):
    """Each deviation, alone, makes the comparison fail on a fixture it touches (and without it
    the comparison passes)."""
    kto_text = fastdpo.data.kto_text
    real = kto_text.tokenize_rows

    def check(records, deviation):
        rows, trl_batches = trl_prepare(records, tok)
        with monkeypatch.context() as m:
            deviation(m)
            with pytest.raises(AssertionError):
                assert_equals_trl(from_records(records, tok), rows, trl_batches)
        assert_equals_trl(from_records(records, tok), rows, trl_batches)

    # completions without their EOS
    check(UNPAIRED_PLAIN, lambda m: m.setattr(kto_text, "tokenize_rows", lambda rows, start, t, plan: real(
        rows, start, t, dataclasses.replace(plan, eos=""))))
    # the completion starting right after the tokenized prompt
    check(UNPAIRED_SEAM, lambda m: m.setattr(kto_text, "common_prefix_length", lambda prompt, whole: len(prompt)))

    # a pair's chosen and rejected next to each other (not TRL's chunk order)
    def interleaved(rows, start, t, plan):
        out = real(rows, start, t, plan)
        n = len(rows)
        order = [j for i in range(n) for j in (i, n + i)] if plan.paired else range(len(out["label"]))
        return {k: [v[j] for j in order] for k, v in out.items()}

    check(PLAIN, lambda m: m.setattr(kto_text, "tokenize_rows", interleaved))

    # KL sequences not rotated, or rotated the other way (completion i + 1)
    ds = from_records(UNPAIRED_PLAIN, tok)
    _, trl_batches = trl_prepare(UNPAIRED_PLAIN, tok)
    items = [ds[i] for i in range(B)]
    ours = ds.collate(items)
    assert_batch_equals_trls(ours, trl_batches[0])
    prompts, completions = [p for p, _, _ in items], [c for _, c, _ in items]
    for kl in ((ours["seq"], ours["prompt_mask"], ours["seq_mask"]),
               ds._rows(prompts, completions[1:] + completions[:1], "KL sequences")):
        with pytest.raises(AssertionError):
            assert_batch_equals_trls(dict(ours, **dict(zip(("kl_seq", "kl_prompt_mask", "kl_seq_mask"), kl))),
                                     trl_batches[0])


# ----------------------------------------------------------------------------- KTO end to end


@pytest.mark.parametrize("name, max_length, loss_type", [
    ("plain", 14, "kto"), ("pairs_conversation", 30, "kto"), ("plain", None, "apo_zero_unpaired")])
def test_kto_on_a_batch_is_trls_loss(name, max_length, loss_type, tok_eos_pad):
    """``KTO(llama, logprob_reduction="sum", mask_alignment="target")(**batch)`` on each collated
    batch is TRL's ``KTOTrainer._compute_loss`` on TRL's batch of the same records (TRL's side
    in float64 from the same model's logits: loss within 1e-6, gradients 1e-5, metrics 1e-5,
    tests/test_kto.py's ``assert_same``); the KL sequences matter (not rotated, the comparison fails)."""
    records = FIXTURES[name]
    kl = loss_type == "kto"
    ds = from_records(records, tok_eos_pad, max_length=max_length, kl=kl)
    _, trl_batches = trl_prepare(records, tok_eos_pad, max_length, kl=kl)
    model = llama(len(tok_eos_pad))
    kto = KTO(model, beta=0.3, loss_type=loss_type, logprob_reduction="sum", mask_alignment="target")
    perturb(model, seed=8, std=0.05)
    perturb_frozen(kto.ref_model, seed=3, std=0.1)  # a reference whose KL estimates are positive here
    options = dict(beta=0.3, loss_type=loss_type)
    assert len(trl_batches) == 2
    for batch, trl_batch in zip(batches(ds), trl_batches):
        ours = ours_step(kto, batch)
        want = reference_step(model, lambda: trl_kto(logits_of(model), logits_of(kto.ref_model), trl_batch, **options))
        assert_same(ours, want, what=name)
        assert float(ours[2]["kl"]) > 0 or not kl  # (the baseline is not clamped away)
    if kl:
        unrotated = dict(batch, kl_seq=batch["seq"], kl_prompt_mask=batch["prompt_mask"], kl_seq_mask=batch["seq_mask"])
        with pytest.raises(AssertionError):
            assert_same(ours_step(kto, unrotated), want)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("records, error, match", [
    ([dict(prompt="a", completion="b", label=True), dict(prompt="a", completion="b")], ValueError,
     r"records\[1\] has no 'label' field"),
    ([dict(prompt="a", label=True)], ValueError, r"records\[0\] has no 'completion' field"),
    ([dict(completion="b", label=True)], ValueError, r"records\[0\] has no 'prompt' field"),
    ([dict(prompt="a", completion="b", label=True), dict(prompt="a", completion="b", label=1)], TypeError,
     r"records\[1\]\['label'\] must be a bool \(True = desirable\), got int"),
    ([dict(prompt="a", completion="b", label="yes")], TypeError, r"records\[0\]\['label'\] must be a bool"),
    ([dict(prompt="hi", completion=[assistant("x")], label=True)], TypeError,
     r"records\[0\]\['prompt'\] must be a list of messages"),
    ([dict(prompt=[user("hi")], completion=[assistant("x")], label=True),
      dict(prompt=[user("hi")], completion="x", label=False)], TypeError,
     r"records\[1\]\['completion'\] must be a list of messages"),
    ([dict(prompt="hi", completion="x", label=True), dict(prompt="hi", completion=5, label=True)], TypeError,
     r"records\[1\]\['completion'\] must be a str"),
    ([dict(prompt=[user("hi")], completion=[], label=True)], ValueError,
     r"records\[0\]\['completion'\] tokenizes to nothing"),
    ([dict(prompt=[user("hi")], chosen=[assistant("x")], rejected=[])], ValueError,
     r"records\[0\]\['rejected'\] tokenizes to nothing"),
    ([dict(prompt="a", chosen="b", rejected="c"), dict(prompt="a", completion="b", label=True)], ValueError,
     r"records\[1\] has no 'chosen' field"),
    ([dict(chosen="ab", rejected="ac"), dict(prompt="a", chosen="b", rejected="c")], ValueError,
     r"records\[1\] has a 'prompt' field but records\[0\] has none"),
    ([], ValueError, "records is empty"),
    (["text"], TypeError, r"records\[0\] must be a mapping"),
])
def test_bad_records(records, error, match, tok):
    with pytest.raises(error, match=match):
        TokenizedKTODataset.from_records(records, tok)


def test_bad_records_in_a_dataset_name_their_index(tok):
    records = datasets.Dataset.from_list([dict(prompt="a", completion="b", label=True)] * 3
                                         + [dict(prompt="a", completion="b", label=None)])
    with pytest.raises(ValueError, match=r"records\[3\] has no 'label' field"):
        TokenizedKTODataset.from_records(records, tok)


@pytest.mark.parametrize("kw, error, match", [
    (dict(truncation_mode="keep_end", max_length=8), ValueError,
     r"truncation_mode='keep_end': TRL 1.16's KTOTrainer has only 'keep_start'"),
    (dict(truncation_mode="keep_middle"), ValueError, "truncation_mode must be one of"),
    (dict(max_length=1), ValueError, "max_length must be an int >= 2"),
    (dict(kl=1), TypeError, "kl must be a bool"),
    (dict(tools=[]), ValueError, "these records are plain text"),
    (dict(num_proc=2), ValueError, "num_proc parallelizes datasets.Dataset.map"),
])
def test_bad_arguments(kw, error, match, tok):
    with pytest.raises(error, match=match):
        TokenizedKTODataset.from_records(UNPAIRED_PLAIN, tok, **kw)
    with pytest.raises(TypeError, match="must be a transformers tokenizer"):
        TokenizedKTODataset.from_records(UNPAIRED_PLAIN, object())
