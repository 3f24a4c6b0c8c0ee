"""TokenizedPreferenceDataset.from_records (fastdpo/data/text.py) against TRL 1.16's own data path.

TRL's side is its real code, called unbound on a stub trainer: ``DPOTrainer._prepare_dataset``
(prompt extraction, EOS, its tokenize function, the prompt boundary, the ``max_length`` drop)
on a ``datasets.Dataset`` of the same records, then ``DataCollatorForPreference`` on its rows.
The stub carries what the method reads (``_tokenizer``; ``args`` with ``dataset_num_proc``,
``max_length``, ``truncation_mode``), and the tokenizer gets the pad token ``DPOTrainer.__init__``
gives it before preparing the data (its EOS token when it has none).

The tokenizers are built here (a byte-level BPE trained on a few sentences, wrapped as a
``PreTrainedTokenizerFast`` with a small chat template): no download.  Each fixture's ids, and
the collated batch as ``DPO.forward`` takes it, must equal TRL's exactly: rows ``prompt_ids``,
``chosen_ids``, ``rejected_ids``; ``input_ids = cat(preferred_seq, unpreferred_seq)``,
``attention_mask`` = the sequence masks, ``completion_mask = ~prompt_mask & seq_mask``.  Controls
show that a deliberate deviation (no EOS, the boundary after the tokenized prompt, masks from
``seq != pad_id``, the other truncation side, a plain common prefix) fails that comparison.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

import fastdpo.data.records  # noqa: E402
import fastdpo.data.text  # noqa: E402
from fastdpo import DPO, PreferenceDataset, TokenizedPreferenceDataset  # noqa: E402

from helpers import rel_err  # noqa: E402
from trl_harness import trl_dpo_loss  # noqa: E402

# ----------------------------------------------------------------------------- tokenizers

CORPUS = [
    "The sky is blue and the sea is green.", "Say hello to the help desk.", "hello hello help help helpful",
    "What color is the sky? It is blue.", "Where is the sun? In the sky.", "The weather in Paris is sunny.",
    "get_weather returns the weather of a city.", "Think before you answer the question.",
] * 4
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|tool|>", "<|tools|>",
           "<|call|>", "<think>"]
# Tools first (as JSON), each message with its role's token, an assistant's tool calls, and the
# generation prompt; ``think`` (a chat_template_kwarg) opens a thought only in the generation
# prompt, so the prompt alone renders differently from the conversation (as Gemma 4's does).
TEMPLATE = (
    "{% if tools %}<|tools|>{{ tools | tojson }}</s>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% if m.tool_calls %}<|call|>{{ m.tool_calls | tojson }}{% endif %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if think %}<think>{% endif %}{% endif %}"
)


def make_tokenizer(*, bos: bool = False, pad: bool = True, eos: bool = True, template: bool = True):
    """A byte-level BPE trained on CORPUS; ``bos``: every text starts with ``<s>`` (as Llama's
    tokenizers); ``pad=False``: no pad token (TRL pads with EOS, and so does fastdpo)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>" if eos else None,
        pad_token="<pad>" if pad else None, bos_token="<s>" if bos else None)
    if template:
        hf.chat_template = TEMPLATE
    return hf


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tok_eos_pad():
    """BOS first, no pad token: batches are padded with the EOS id."""
    return make_tokenizer(bos=True, pad=False)


# ----------------------------------------------------------------------------- records


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


PLAIN = [
    dict(prompt="The sky is", chosen=" blue.", rejected=" green and the sea is blue."),
    dict(prompt="What color is the sky?", chosen=" It is blue.</s>", rejected=" Green."),  # EOS already there
    dict(prompt="Where is the sun? In the", chosen=" sky.", rejected=" sea, the sun is in the sea."),
    dict(prompt="Say hello to the help desk. The weather in Paris is", chosen=" sunny.", rejected=" green."),
]
# Tokens merge across the seam: " hel" + "lo" is one token " hello", " hel" + "p" is " help",
# " s" "k" + "y" is " sky".
SEAM = [
    dict(prompt="Say hel", chosen="lo to the help desk.", rejected="p me."),
    dict(prompt="Where is the sun? In the sk", chosen="y.", rejected="y, the sun is blue."),
    dict(prompt="The weather in Paris is", chosen=" sunny.", rejected=" blue."),
]
# No prompt: the shared start, with TRL's two edge rules (a space before the first difference
# stays out of the prompt, and also for a difference at the first character; a pair where one
# is a prefix of the other keeps one shared character out of the prompt).
IMPLICIT = [
    dict(chosen="The sky is blue.", rejected="The sky is green."),
    dict(chosen="Where is the sun? In the sky.", rejected="Where is the sun? In the sea."),
    dict(chosen="Say hello", rejected="Say hello to the help desk."),
    dict(chosen="hello ", rejected="Think before you answer."),
]
CONVERSATION = [
    dict(prompt=[{"role": "system", "content": "Answer briefly."}, user("What color is the sky?")],
         chosen=[assistant("It is blue.")], rejected=[assistant("The sky is green and the sea is blue.")]),
    dict(prompt=[user("Where is the sun?"), assistant("In the sky."), user("And the sea?")],
         chosen=[assistant("The sea is blue.")], rejected=[assistant("Green.")]),
    dict(prompt=[user("Say hello to the help desk.")], chosen=[assistant("hello help desk")],
         rejected=[assistant("Think before you answer the question.")]),
]
IMPLICIT_CONVERSATION = [
    dict(chosen=[user("What color is the sky?"), assistant("It is blue.")],
         rejected=[user("What color is the sky?"), assistant("Green.")]),
    dict(chosen=[user("Where is the sun?"), assistant("In the sky."), user("And the sea?"), assistant("Blue.")],
         rejected=[user("Where is the sun?"), assistant("In the sky."), user("And the sea?"),
                   assistant("The sea is green.")]),
]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
TOOLS = [
    dict(prompt=[user("What is the weather in Paris?"), {"role": "assistant", "content": "", "tool_calls": CALL},
                 {"role": "tool", "content": "sunny"}],
         chosen=[assistant("The weather in Paris is sunny.")], rejected=[assistant("It is green.")],
         tools=json.dumps(WEATHER), chat_template_kwargs={"think": True}),
    dict(prompt=[user("Is the sky blue?")], chosen=[assistant("It is blue.")],
         rejected=[assistant("The weather in Paris is sunny.")], tools=json.dumps(WEATHER),
         chat_template_kwargs={"think": False}),
]
FIXTURES = {"plain": PLAIN, "seam": SEAM, "implicit": IMPLICIT, "conversation": CONVERSATION,
            "implicit_conversation": IMPLICIT_CONVERSATION, "tools": TOOLS}


# ----------------------------------------------------------------------------- TRL's side


def trl_prepare(records, tokenizer, max_length=None, mode="keep_start"):
    """TRL 1.16's rows (``_prepare_dataset``) and batch (``DataCollatorForPreference``), or None
    for the batch when every row was dropped."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:  # DPOTrainer.__init__, before it prepares the datasets
        tokenizer.pad_token = tokenizer.eos_token
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's own notices (its prompt-boundary warning)
        prepared = DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(records), tokenizer, args, "train")
    rows = [prepared[i] for i in range(len(prepared))]
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length,
                                         truncation_mode=mode)
    return rows, collator(rows) if rows else None


def from_records(records, tokenizer, **kw) -> TokenizedPreferenceDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the boundary and drop notices; tested on their own
        return TokenizedPreferenceDataset.from_records(records, tokenizer, **kw)


def assert_equals_trl(ds: TokenizedPreferenceDataset, trl_rows, trl_batch, batch=None):
    """fastdpo's rows and collated batch are TRL's, id for id and mask for mask."""
    assert len(ds) == len(trl_rows)
    for i, row in enumerate(trl_rows):
        item = ds[i]
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert item[k].tolist() == row[k], (i, k, item[k].tolist(), row[k])
    b = batch if batch is not None else ds.collate([ds[i] for i in range(len(ds))])
    assert set(b.keys()) == {"preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask"}
    seq = torch.cat((b["preferred_seq"], b["unpreferred_seq"]))
    real = torch.cat((b["preferred_seq_mask"], b["unpreferred_seq_mask"]))
    completion = ~b["prompt_mask"].repeat(2, 1) & real
    assert seq.dtype == torch.long and real.dtype == b["prompt_mask"].dtype == torch.bool
    assert torch.equal(seq, trl_batch["input_ids"]), (seq, trl_batch["input_ids"])
    assert torch.equal(real.long(), trl_batch["attention_mask"]), (real.long(), trl_batch["attention_mask"])
    assert torch.equal(completion.long(), trl_batch["completion_mask"]), (completion, trl_batch["completion_mask"])


def lengths(rows):
    """Each row's prompt, prompt + chosen and prompt + rejected lengths."""
    return [(len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r["chosen_ids"]),
             len(r["prompt_ids"]) + len(r["rejected_ids"])) for r in rows]


def truncating_max_length(rows) -> int:
    """The largest max_length that cuts a record it keeps (its prompt shorter than max_length)."""
    spans = lengths(rows)
    return next(m for m in range(max(max(w, l) for _, w, l in spans), 1, -1)
                if any(p < m < max(w, l) for p, w, l in spans))


# ----------------------------------------------------------------------------- exactly TRL's


@pytest.mark.parametrize("name", list(FIXTURES))
def test_rows_and_batches_equal_trls(name, tok, tok_eos_pad):
    """Untruncated, keep_start with a max_length that cuts (and may drop), keep_end with one
    that cuts every prompt away (one prompt_mask can mark it): each equals TRL's."""
    records = FIXTURES[name]
    for tokenizer in (tok, tok_eos_pad):
        full, _ = trl_prepare(records, tokenizer)
        cut = truncating_max_length(full)
        # keep_end: at most the shortest completion, so every kept window starts past the prompt
        tail = min(min(w, l) - p for p, w, l in lengths(full))
        for max_length, mode in ((None, "keep_start"), (cut, "keep_start"), (tail, "keep_end")):
            rows, batch = trl_prepare(records, tokenizer, max_length, mode)
            ds = from_records(records, tokenizer, max_length=max_length, truncation_mode=mode)
            assert_equals_trl(ds, rows, batch)
            assert ds.indices == list(range(len(records))) or mode == "keep_start"
            if max_length is not None:  # the case truncates
                assert batch["attention_mask"].sum(1).max() == max_length
                assert (batch["attention_mask"].sum(1) < torch.tensor(
                    [w for _, w, _ in lengths(rows)] + [l for _, _, l in lengths(rows)])).any()


def test_keep_start_drops_what_trl_drops(tok):
    rows_full, _ = trl_prepare(CONVERSATION, tok)
    prompts = [p for p, _, _ in lengths(rows_full)]
    max_length = sorted(prompts)[1]  # drops the records whose prompt has that many tokens or more
    rows, batch = trl_prepare(CONVERSATION, tok, max_length)
    assert 0 < len(rows) < len(CONVERSATION)
    with pytest.warns(UserWarning, match=rf"max_length={max_length} drops {len(CONVERSATION) - len(rows)} of "
                                         rf"{len(CONVERSATION)} records"):
        ds = TokenizedPreferenceDataset.from_records(CONVERSATION, tok, max_length=max_length)
    assert ds.indices == [i for i, p in enumerate(prompts) if p < max_length]
    assert_equals_trl(ds, rows, batch)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_dataloader_batches_equal_trls(batch_size, tok_eos_pad):
    """Through a DataLoader, batch by batch (each padded to its own longest sequence)."""
    ds = from_records(PLAIN, tok_eos_pad, max_length=12)
    rows, _ = trl_prepare(PLAIN, tok_eos_pad, 12)
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = DataCollatorForPreference(pad_token_id=tok_eos_pad.eos_token_id, max_length=12)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=ds.collate)
    for k, batch in enumerate(loader):
        part = rows[k * batch_size: (k + 1) * batch_size]
        sub = torch.utils.data.Subset(ds, range(k * batch_size, k * batch_size + len(part)))
        assert_equals_trl(sub, part, collator(part), batch)
    assert k == (len(rows) - 1) // batch_size


def test_seam_fixture_has_merging_tokens(tok):
    """The seam fixture does what it says: the tokenized prompt is not a prefix of prompt +
    completion, and fastdpo says so once."""
    prompt = tok(text=SEAM[0]["prompt"])["input_ids"]
    whole = tok(text=SEAM[0]["prompt"] + SEAM[0]["chosen"])["input_ids"]
    assert whole[: len(prompt)] != prompt
    with pytest.warns(UserWarning, match=r"2 of 3 records \(the first records\[0\]\): the tokenized prompt is not a "
                                         r"prefix") as record:
        TokenizedPreferenceDataset.from_records(SEAM, tok)
    assert len(record) == 1


def test_tools_and_template_arguments_equal_a_column(tok):
    """``tools=`` and ``chat_template_kwargs=`` are every record's column; a record's own tools
    replace them, its own chat_template_kwargs are merged over them."""
    bare = [{k: v for k, v in r.items() if k not in ("tools", "chat_template_kwargs")} for r in TOOLS]
    with_columns = [dict(r, tools=WEATHER, chat_template_kwargs={"think": True}) for r in bare]
    rows, batch = trl_prepare(with_columns, tok)
    assert_equals_trl(from_records(bare, tok, tools=WEATHER, chat_template_kwargs={"think": True}), rows, batch)
    assert_equals_trl(from_records(bare, tok, tools=json.dumps(WEATHER), chat_template_kwargs={"think": True}),
                      rows, batch)
    # the records' own columns (TOOLS has think=False on its second record) win
    rows, batch = trl_prepare(TOOLS, tok)
    assert_equals_trl(from_records(TOOLS, tok, tools=[], chat_template_kwargs={"think": True}), rows, batch)
    # and the arguments change what is rendered (not a vacuous equality)
    plain_rows, _ = trl_prepare(bare, tok)
    assert [r["prompt_ids"] for r in plain_rows] != [r["prompt_ids"] for r in rows]


@pytest.mark.parametrize("kind", ["dataset", "dataset-2-procs", "jsonl"])
def test_other_record_sources_equal_the_list(kind, tok, tmp_path):
    """A datasets.Dataset (through its map, in parallel too) and a JSON Lines file give the ids
    of the same records as a list."""
    records = CONVERSATION + [dict(r) for r in CONVERSATION]
    want = from_records(records, tok, max_length=20)
    if kind == "jsonl":
        path = tmp_path / "records.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
        got = from_records(path, tok, max_length=20)
    else:
        got = from_records(datasets.Dataset.from_list(records), tok, max_length=20,
                           num_proc=2 if kind == "dataset-2-procs" else None)
    assert len(got) == len(want) and got.indices == want.indices and got.pad_id == want.pad_id
    for i in range(len(want)):
        for k, v in want[i].items():
            assert torch.equal(got[i][k], v), (i, k)


def test_long_lists_show_a_progress_bar_only_with_tqdm(tok, monkeypatch):
    assert fastdpo.data.records._progress(10) is not None
    records = PLAIN * (fastdpo.data.records._CHUNK // len(PLAIN) + 1)
    with monkeypatch.context() as m:  # (only around fastdpo: TRL's first import needs tqdm, via accelerate)
        m.setitem(sys.modules, "tqdm.auto", None)  # not installed
        assert fastdpo.data.records._progress(10) is None
        ds = from_records(records, tok)
    rows, batch = trl_prepare(records, tok)
    assert_equals_trl(ds, rows, batch)


# ----------------------------------------------------------------------------- controls


def mutate(monkeypatch, *, plan):
    """A deviation of fastdpo.data.text from TRL: every record read with a changed plan."""
    real = fastdpo.data.text.tokenize_rows
    monkeypatch.setattr(fastdpo.data.text, "tokenize_rows", lambda rows, start, tok, p: real(rows, start, tok, plan(p)))


def test_controls_a_deviation_fails_the_comparison(tok, tok_eos_pad, monkeypatch):
    """Each deviation, alone, makes ``assert_equals_trl`` fail on a fixture it touches."""
    rows, batch = trl_prepare(PLAIN, tok)
    with monkeypatch.context() as m:  # completions without their EOS
        mutate(m, plan=lambda p: dataclasses.replace(p, eos=""))
        with pytest.raises(AssertionError):
            assert_equals_trl(from_records(PLAIN, tok), rows, batch)
    assert_equals_trl(from_records(PLAIN, tok), rows, batch)

    rows, batch = trl_prepare(SEAM, tok)
    with monkeypatch.context() as m:  # the completion starting right after the tokenized prompt
        m.setattr(fastdpo.data.text, "common_prefix_length", lambda prompt, whole: len(prompt))
        with pytest.raises(AssertionError):
            assert_equals_trl(from_records(SEAM, tok), rows, batch)
    assert_equals_trl(from_records(SEAM, tok), rows, batch)

    rows, batch = trl_prepare(IMPLICIT, tok)
    with monkeypatch.context() as m:  # the plain common prefix, without TRL's edge rules

        def common_prefix(i, chosen, rejected):
            n = next((j for j, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
            return chosen[:n], chosen[n:], rejected[n:]

        m.setattr(fastdpo.data.records, "extract_prompt", common_prefix)
        with pytest.raises(AssertionError):
            assert_equals_trl(from_records(IMPLICIT, tok), rows, batch)
    assert_equals_trl(from_records(IMPLICIT, tok), rows, batch)  # (and unmutated it passes)

    # sequence masks read as seq != pad_id, with the EOS id as the pad id: the completions' own
    # EOS tokens fall out of the mask TRL scores
    rows, batch = trl_prepare(PLAIN, tok_eos_pad)
    ds = from_records(PLAIN, tok_eos_pad)
    b = ds.collate([ds[i] for i in range(len(ds))])
    assert ds.pad_id == tok_eos_pad.eos_token_id
    b = dict(b, preferred_seq_mask=b["preferred_seq"] != ds.pad_id, unpreferred_seq_mask=b["unpreferred_seq"] != ds.pad_id)
    with pytest.raises(AssertionError):
        assert_equals_trl(ds, rows, batch, b)

    # the other truncation side
    rows, batch = trl_prepare(CONVERSATION, tok, 4, "keep_end")
    ds = from_records(CONVERSATION, tok, max_length=4, truncation_mode="keep_end")
    assert_equals_trl(ds, rows, batch)
    ds.truncation_mode = "keep_start"
    with pytest.raises(AssertionError):
        assert_equals_trl(ds, rows, batch)


# ----------------------------------------------------------------------------- DPO end to end


def llama(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def perturb(model, seed: int = 1, std: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def logits_of(model):
    """(N, L, V) logits of TRL's ``input_ids`` as its head reads them (the last position
    predicts nothing: computed on ``ids[:, :-1]``, as fastdpo runs the model)."""
    def logits(ids, attention):
        z = model(input_ids=ids[:, :-1], use_cache=False).logits
        return torch.cat((z, z.new_zeros(z.shape[0], 1, z.shape[2])), 1)
    return logits


@pytest.mark.parametrize("name, max_length", [("plain", 14), ("conversation", 30)])
def test_dpo_on_a_batch_is_trls_loss(name, max_length, tok_eos_pad):
    """``DPO(llama, logprob_reduction="sum", mask_alignment="target")(**batch)`` on a collated
    batch is TRL's ``_compute_loss`` on TRL's collated batch of the same records (float64 truth;
    ours no further from it than TRL's float32 computation, plus 1e-6), loss and gradients; with
    masks read from the pad id (the EOS id here) it is not."""
    records = FIXTURES[name]
    tokenizer = tok_eos_pad
    ds = from_records(records, tokenizer, max_length=max_length)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    rows, trl_b = trl_prepare(records, tokenizer, max_length)
    assert len(rows) >= 2 and trl_b["attention_mask"].sum(1).max() == max_length  # (a batch, cut)
    model = llama(len(tokenizer))
    dpo = DPO(model, beta=0.1, logprob_reduction="sum", mask_alignment="target")
    perturb(model)
    loss = dpo(**batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    def trl(dtype):
        out = trl_dpo_loss(logits_of(model), logits_of(dpo.ref_model.eval()), trl_b["input_ids"],
                           trl_b["completion_mask"], trl_b["attention_mask"], beta=0.1, dtype=dtype,
                           compute_dtype=dtype)
        out.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    truth, truth_g = trl(torch.float64)
    trl32, trl32_g = trl(torch.float32)
    err_trl = abs(trl32.item() - truth.item())
    assert abs(loss.item() - truth.item()) <= err_trl + 1e-6 * abs(truth.item()), (loss.item(), truth.item())
    for n in truth_g:
        assert rel_err(got[n], truth_g[n]) <= rel_err(trl32_g[n], truth_g[n]) + 1e-5, n

    # control: the masks a pad_id would give lose each completion's EOS token: plain text ends
    # with it (another loss), a chat template puts it between messages too (a hole DPO refuses)
    bad = dict(batch, preferred_seq_mask=batch["preferred_seq"] != ds.pad_id,
               unpreferred_seq_mask=batch["unpreferred_seq"] != ds.pad_id)
    if name == "plain":
        assert abs(dpo(**bad).item() - truth.item()) > 1e-3 * abs(truth.item())
    else:
        with pytest.raises(ValueError, match="padding between real tokens"):
            dpo(**bad)


def test_precomputed_reference_scores_of_mapping_batches(tok_eos_pad):
    """precompute_reference_scores takes the mapping batches; passed back, they give the loss of
    the step that runs the reference."""
    from fastdpo import precompute_reference_scores

    ds = from_records(PLAIN, tok_eos_pad)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=ds.collate)
    model = llama(len(tok_eos_pad))
    dpo = DPO(model, logprob_reduction="sum", mask_alignment="target")
    perturb(model)
    ref_w, ref_l = precompute_reference_scores(dpo, loader, progress=False)
    assert ref_w.shape == ref_l.shape == (len(ds),)
    for k, batch in enumerate(loader):
        part = slice(2 * k, 2 * k + len(batch["preferred_seq"]))
        w, l = dpo.reference_scores(**batch)
        assert torch.equal(ref_w[part], w) and torch.equal(ref_l[part], l)
        # given scores skip the pair op's reference scoring (another op, another sum order): the
        # same loss to float rounding, the 1e-6 relative of the library's loss tests
        torch.testing.assert_close(dpo(**batch, ref_preferred_logprob=ref_w[part], ref_unpreferred_logprob=ref_l[part]),
                                   dpo(**batch), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("records, match", [
    ([dict(prompt="a", chosen="b", rejected="c"), dict(prompt="a", chosen="b")],
     r"records\[1\] has no 'rejected' field"),
    ([dict(prompt="a", chosen="b", rejected="c"), dict(chosen="b", rejected="c")],
     r"records\[1\] has no 'prompt' field"),
    ([dict(chosen="ab", rejected="ac"), dict(prompt="a", chosen="b", rejected="c")],
     r"records\[1\] has a 'prompt' field but records\[0\] has none"),
    ([dict(prompt=None, chosen="ab", rejected="")], r"records\[0\] has no 'prompt' and an empty 'rejected'"),
    ([dict(prompt=[user("hi")], chosen=[], rejected=[assistant("Green.")])],
     r"records\[0\]: the chosen completion tokenizes to nothing"),
    ([dict(prompt="hi", chosen=[assistant("x")], rejected=[assistant("y")])],
     r"records\[0\]\['prompt'\] must be a list of messages"),
    ([dict(prompt="hi", chosen="x", rejected="y"), dict(prompt="hi", chosen="x", rejected=5)],
     r"records\[1\]\['rejected'\] must be a str"),
    ([], "records is empty"),
])
def test_bad_records(records, match, tok):
    with pytest.raises((ValueError, TypeError), match=match):
        TokenizedPreferenceDataset.from_records(records, tok)


def test_bad_records_in_a_dataset_name_their_index(tok):
    records = datasets.Dataset.from_list([dict(prompt="a", chosen="b", rejected="c")] * 3
                                         + [dict(prompt="a", chosen="b", rejected=None)])
    with pytest.raises(ValueError, match=r"records\[3\] has no 'rejected' field"):
        TokenizedPreferenceDataset.from_records(records, tok)


def test_bad_tokenizers():
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        TokenizedPreferenceDataset.from_records(PLAIN, make_tokenizer(pad=False, eos=False))
    with pytest.raises(ValueError, match="plain-text records need the tokenizer's EOS token"):
        TokenizedPreferenceDataset.from_records(PLAIN, make_tokenizer(eos=False))
    no_template = make_tokenizer(template=False)
    with pytest.raises(ValueError, match=r"conversational records need a chat template.*chat_template is None"):
        TokenizedPreferenceDataset.from_records(CONVERSATION, no_template)
    # (the template given as an argument is one)
    ds = from_records(CONVERSATION, no_template, chat_template_kwargs={"chat_template": TEMPLATE})
    assert len(ds) == len(CONVERSATION)
    with pytest.raises(TypeError, match="must be a transformers tokenizer"):
        TokenizedPreferenceDataset.from_records(PLAIN, object())


def test_max_length_dropping_every_record(tok):
    with pytest.raises(ValueError, match=r"max_length=3 drops all 4 records: each prompt alone has max_length "
                                         r"tokens or more \(the shortest 3\)"):
        TokenizedPreferenceDataset.from_records(PLAIN, tok, max_length=3)
    rows, _ = trl_prepare(PLAIN, tok, 3)
    assert rows == []  # TRL drops them all too


def test_keep_end_refuses_what_one_prompt_mask_cannot_mark(tok):
    """keep_end cuts the two sequences of a pair on their own: when that leaves different
    prompt lengths before the two completions, fastdpo refuses (TRL's batch shows why)."""
    rows, batch = trl_prepare(PLAIN, tok, 8, "keep_end")
    b = len(rows)
    prompt_tokens = (batch["attention_mask"] - batch["completion_mask"]).sum(1)
    differ = [i for i in range(b) if prompt_tokens[i] != prompt_tokens[b + i]]
    assert differ
    with pytest.raises(ValueError, match=rf"keeps {int(prompt_tokens[differ[0]])} prompt tokens before "
                                         rf"records\[{differ[0]}\]'s chosen completion and "
                                         rf"{int(prompt_tokens[b + differ[0]])} before its rejected one "
                                         rf"\({len(differ)} such records\)"):
        TokenizedPreferenceDataset.from_records(PLAIN, tok, max_length=8, truncation_mode="keep_end")


@pytest.mark.parametrize("kw, err, match", [
    (dict(max_length=1), ValueError, "max_length must be an int >= 2"),
    (dict(max_length=True), ValueError, "max_length"),
    (dict(truncation_mode="keep_middle"), ValueError, "truncation_mode must be one of"),
    (dict(tools=[]), ValueError, "these records are plain text"),
    (dict(chat_template_kwargs={"think": True}), ValueError, "these records are plain text"),
    (dict(chat_template_kwargs=[1]), TypeError, "chat_template_kwargs must be a mapping"),
    (dict(num_proc=2), ValueError, "num_proc parallelizes datasets.Dataset.map"),
    (dict(num_proc=0), ValueError, "num_proc must be an int >= 1"),
])
def test_bad_arguments(kw, err, match, tok):
    with pytest.raises(err, match=match):
        TokenizedPreferenceDataset.from_records(PLAIN, tok, **kw)


def test_bad_template_arguments_and_sources(tok, tmp_path):
    with pytest.raises(ValueError, match=r"records\[0\]: chat_template_kwargs must not set \['add_generation_pr"):
        TokenizedPreferenceDataset.from_records(CONVERSATION, tok, chat_template_kwargs={"add_generation_prompt": True})
    with pytest.raises(ValueError, match=r"records\[0\]\['tools'\] is a str but not JSON"):
        TokenizedPreferenceDataset.from_records([dict(CONVERSATION[0], tools="{nope")], tok)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PLAIN[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not a JSON object"):
        TokenizedPreferenceDataset.from_records(path, tok)
    with pytest.raises(TypeError, match="records must be a list of dicts, a datasets.Dataset or a JSON Lines path"):
        TokenizedPreferenceDataset.from_records(5, tok)
    with pytest.raises(TypeError, match="one split"):
        TokenizedPreferenceDataset.from_records(datasets.DatasetDict(train=datasets.Dataset.from_list(PLAIN)), tok)
    with pytest.raises(TypeError, match=r"records\[0\] must be a mapping"):
        TokenizedPreferenceDataset.from_records(["text"], tok)


def test_collate_checks_its_items(tok):
    ds = from_records(PLAIN, tok)
    with pytest.raises(ValueError, match="empty batch"):
        ds.collate([])
    with pytest.raises(TypeError, match="batch item 0 must be a dataset item"):
        ds.collate([(torch.tensor([1]), torch.tensor([2]), torch.tensor([True]))])
