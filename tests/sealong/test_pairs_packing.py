"""Pairs data: shared-prompt packing == the classic two-sequence layout (sums, loss and gradients), middle
truncation, counted skips and file:line errors."""

import json

import pytest
import torch
from train_fixtures import build_tokenizer, make_model_folder, write_pairs, one_thread  # noqa: F401 (autouse fixture)

from sealong.model import load_model
from sealong.train.pairs import IGNORE, Pair, load_pairs, pack_pair, pad_row, truncate_middle
from sealong.train.loss import METRIC_NAMES, micro_objective, row_logp_sums

RTOL = 1e-5  # float32: the two layouts differ only in the order of sums (packed attention over more keys)


def _random_pair(vocab, p, c, r, seed):
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(6, vocab, (n,), generator=g)  # noqa: E731
    return Pair(f"p{seed}", draw(p), draw(c), draw(r))


def _sums_and_grads(model, pairs, layout):
    model.zero_grad(set_to_none=True)
    sums = torch.zeros(2 * len(pairs))
    for j, pair in enumerate(pairs):
        for row in pack_pair(pair, j, layout):
            hidden = model(row.input_ids, row.position_ids, segment_ids=row.segment_ids)
            sums = sums + row_logp_sums(hidden, model.lm_head.weight, row.labels, row.seq_index, 2 * len(pairs))[0]
    counts = torch.tensor([n for p in pairs for n in (p.chosen.numel(), p.rejected.numel())])
    loss, metrics = micro_objective(sums, counts, mode="orpo", beta=0.1, nll_weight=1.0,
                                    batch_chosen_tokens=int(counts[0::2].sum()), batch_pairs=len(pairs))
    loss.backward()
    return sums.detach(), loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_packed_equals_two_sequences(tmp_path):
    model = load_model(make_model_folder(str(tmp_path / "m")), dtype=torch.float32)
    vocab = model.config.vocab_size
    pairs = [_random_pair(vocab, 23, 7, 11, 1), _random_pair(vocab, 9, 13, 5, 2)]
    packed = _sums_and_grads(model, pairs, "packed")
    classic = _sums_and_grads(model, pairs, "classic")
    assert _rel(packed[0], classic[0]) < RTOL
    assert _rel(packed[1], classic[1]) < RTOL
    assert _rel(packed[2], classic[2]) < RTOL
    for name, grad in classic[3].items():
        assert _rel(packed[3][name], grad) < RTOL, name
    # the packed row is P + C + R + 1 tokens (one repeated prompt token), the classic rows 2P + C + R
    rows = pack_pair(pairs[0], 0, "packed")
    assert len(rows) == 1 and rows[0].input_ids.numel() == 23 + 7 + 11 + 1


def test_packed_layout_fields():
    pair = Pair("x", torch.tensor([10, 11, 12]), torch.tensor([20, 21]), torch.tensor([30]))
    (row,) = pack_pair(pair, index=1)
    assert row.input_ids.tolist() == [10, 11, 12, 20, 21, 12, 30]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert row.segment_ids.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert row.labels.tolist() == [IGNORE, IGNORE, 20, 21, IGNORE, 30, IGNORE]
    assert row.seq_index.tolist() == [-1, -1, 2, 2, -1, 3, -1]
    padded = pad_row(row, 4)
    assert padded.input_ids.numel() == 8 and padded.labels[-1] == IGNORE and padded.position_ids[-1] == 4


def test_prompt_labels_for_trl_nll():
    """prompt_seq: the prompt's tokens after the first are labels of sequence prompt_seq (packed: the shared
    prompt; classic: the chosen row only), the answers' labels unchanged."""
    pair = Pair("x", torch.tensor([10, 11, 12]), torch.tensor([20, 21]), torch.tensor([30]))
    (row,) = pack_pair(pair, index=1, prompt_seq=5)
    assert row.labels.tolist() == [11, 12, 20, 21, IGNORE, 30, IGNORE]
    assert row.seq_index.tolist() == [5, 5, 2, 2, -1, 3, -1]
    chosen, rejected = pack_pair(pair, index=1, layout="classic", prompt_seq=5)
    assert chosen.labels.tolist() == [11, 12, 20, 21, IGNORE] and chosen.seq_index.tolist() == [5, 5, 2, 2, -1]
    assert rejected.labels.tolist() == [IGNORE, IGNORE, 30, IGNORE] and rejected.seq_index.tolist() == [-1, -1, 3, -1]
    (sft,) = pack_pair(Pair("s", pair.prompt, pair.chosen, None), 0, prompt_seq=1)
    assert sft.labels.tolist() == [11, 12, 20, 21, IGNORE] and sft.seq_index.tolist() == [1, 1, 0, 0, -1]


@pytest.mark.parametrize("layout", ["packed", "classic"])
def test_nll_over_prompt_and_answer_is_trls(tmp_path, layout):
    """nll_tokens="all": the loss is TRL's ORPOTrainer's, computed here as TRL does (a causal LM over prompt +
    chosen answer, cross-entropy over every token after the first, token mean over the batch's chosen rows)."""
    from sealong_kernels.reference import orpo_objective

    from sealong.train.pairs import prompt_label_count

    model = load_model(make_model_folder(str(tmp_path / "m")), dtype=torch.float32)
    w = model.lm_head.weight
    pairs = [_random_pair(model.config.vocab_size, 23, 7, 11, 1), _random_pair(model.config.vocab_size, 9, 13, 5, 2)]
    sums = torch.zeros(3 * len(pairs))
    for j, pair in enumerate(pairs):
        for row in pack_pair(pair, j, layout, prompt_seq=2 * len(pairs) + j):
            hidden = model(row.input_ids, row.position_ids, segment_ids=row.segment_ids)
            sums = sums + row_logp_sums(hidden, w, row.labels, row.seq_index, 3 * len(pairs))[0]
    counts = torch.tensor([n for p in pairs for n in (p.chosen.numel(), p.rejected.numel())])
    extra = (sums[4:], torch.tensor([prompt_label_count(p) for p in pairs]))
    loss, metrics = micro_objective(sums[:4], counts, mode="orpo", beta=0.1, nll_weight=1.0,
                                    batch_chosen_tokens=int(counts[0::2].sum()), batch_pairs=2, nll_extra=extra,
                                    batch_extra_tokens=int(extra[1].sum()))
    nll, n, answer = 0.0, 0, []
    with torch.no_grad():
        for pair in pairs:
            for k, ans in enumerate((pair.chosen, pair.rejected)):
                ids = torch.cat([pair.prompt, ans])
                logp = torch.log_softmax(model(ids, torch.arange(ids.numel()))[:-1] @ w.T, -1)
                logp = logp.gather(1, ids[1:, None])[:, 0]
                answer.append(logp[-ans.numel():].sum())
                if k == 0:
                    nll, n = nll - logp.sum(), n + ids.numel() - 1
    want, _ = orpo_objective(torch.stack(answer), counts, beta=0.1, nll_weight=0.0)
    want = want + nll / n
    assert float(loss.detach()) == pytest.approx(float(want), rel=RTOL)
    assert float(metrics[METRIC_NAMES.index("nll_loss")]) / n == pytest.approx(float(nll / n), rel=RTOL)  # a sum over its tokens


def test_truncate_middle_keeps_head_and_tail():
    ids = torch.arange(10)
    assert truncate_middle(ids, 5).tolist() == [0, 1, 2, 8, 9]
    assert truncate_middle(ids, 12).tolist() == list(range(10))


def test_load_counts_truncation_and_skips(tmp_path):
    tok = build_tokenizer()
    extra = [json.dumps({"id": "e1", "prompt": "w1 w2", "chosen_text": "  ", "rejected_text": "w3"}),
             json.dumps({"id": "e2", "skipped": "all outputs identical"}),
             json.dumps({"id": "e3", "prompt": "w1", "chosen_text": " ".join(["w5"] * 40), "rejected_text": "w3"})]
    path = write_pairs(str(tmp_path / "pairs.jsonl"), 5, prompt_len=(30, 40), answer_len=(3, 5), extra=extra)
    data = load_pairs(path, tok, max_length=24)
    assert len(data.pairs) == 5 and data.truncated == 5
    assert sum(data.skipped.values()) == 3 and len(data.skipped) == 3
    for pair in data.pairs:
        longest = max(pair.chosen.numel(), pair.rejected.numel())
        assert pair.truncated and pair.prompt.numel() + longest == 24
        assert pair.prompt[0] == tok.bos_token_id  # the chat header survives the middle cut
        assert pair.chosen[-1] == tok.eos_token_id and pair.rejected[-1] == tok.eos_token_id
    full = load_pairs(path, tok, max_length=4096)
    assert full.truncated == 0 and len(full.pairs) == 6  # e3 fits now
    first = json.loads(open(path).readline())["prompt"]
    want = tok("<s> user: " + first + " assistant:", add_special_tokens=False)["input_ids"]
    assert full.pairs[0].prompt.tolist() == want  # the chat template, one BOS


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt": "w1", "chosen_text": 3, "rejected_text": "w2"}), "'chosen_text' must be a string"),
    (json.dumps({"prompt": "w1", "chosen_text": "w2"}), "'rejected_text' must be a string"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = write_pairs(str(tmp_path / "pairs.jsonl"), 2, extra=[line])
    with pytest.raises(ValueError, match=rf"pairs.jsonl:3: .*{message}"):
        load_pairs(path, build_tokenizer())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_pairs(str(tmp_path / "nothing.jsonl"), build_tokenizer())


def test_sft_needs_only_chosen(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"id": 1, "prompt": "w1 w2", "chosen_text": "w3 w4"}) + "\n")
    data = load_pairs(str(path), build_tokenizer(), mode="sft")
    assert len(data.pairs) == 1 and data.pairs[0].rejected is None
    (row,) = pack_pair(data.pairs[0], 0, "packed")
    assert (row.seq_index[row.labels != IGNORE] == 0).all()


def test_context_question_records_use_the_paper_prompt(tmp_path):
    from sealong.data import prompts

    tok = build_tokenizer()
    record = {"id": "a", "context": "w1 w2 w3", "question": "w4 w5", "chosen_text": "w6", "rejected_text": "w7"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (pair,) = load_pairs(str(path), tok, strategy="step_by_step").pairs
    assert pair.prompt.tolist() == prompts.prompt_token_ids(tok, "w1 w2 w3", "w4 w5", "step_by_step")
    assert (pair.prompt == tok.bos_token_id).sum() == 1
    with pytest.raises(ValueError, match="unknown prompt strategy 'nope'"):
        load_pairs(str(path), tok, strategy="nope")
