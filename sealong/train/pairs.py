"""Training data: read preference pairs (or SFT records), tokenize them, and lay them out for the model.

Input records (JSON lines, one per question; the scoring stage writes them):
    {"id": ..., "context": ..., "question": ..., "chosen_text": ..., "rejected_text": ...}
A record may give its user message directly as `prompt` instead of `context` + `question`. SFT needs only
`chosen_text`. TRL's preference format is read too (`prompt` / `chosen` / `rejected`, see `trl_record`), and
the file may be JSON lines, a JSON file (a list of records, or columns) or a `datasets` folder written by
`save_to_disk` (see `preference_records`). `id` is optional (the line or record number stands in); when given it
is a string or an integer, unique in the file. A record with a `skipped` reason, or an empty chosen / rejected
text, is skipped and counted.
With `pair_weighting="margin"` every record also carries `score_margin`, the MBR score of the chosen minus
that of the rejected answer (finite, >= 0; the scoring stage writes it): pair i weighs w_i = m_i / mean_j m_j
over the pairs read (mean weight 1, so the learning rate keeps its meaning; Self-Consistency Preference
Optimization, Prasad et al. 2024, arXiv 2411.04109, weights each pair's loss by its vote margin). The ratio
is computed exactly (fractions) and rounded once, the same on every rank: equal margins weigh exactly 1.
A malformed line stops loading with the file and line; nothing is read lazily, so a bad record never
stops training in the middle of an epoch.

Layouts of one pair (prompt p of P tokens, chosen c, rejected r; answers end with the EOS token):

    packed   tokens    p0 .. p[P-2] | p[P-1] c0 .. c[C-1] | p[P-1] r0 .. r[R-1]
             segment   0  ..  0     | 1      1  ..  1     | 2      2  ..  2
             position  0  ..  P-2   | P-1    P  .. P+C-1  | P-1    P  .. P+R-1
             labels    -100 ..      | c0     c1 .. -100   | r0     r1 .. -100
    classic  two rows: p + c and p + r, positions from 0, labels on the answer tokens.

Segment 0 is the shared prompt; chosen tokens (segment 1) see the prompt and themselves, rejected tokens
(segment 2) see the prompt and themselves, never the chosen answer. The prompt's last token is repeated at
the head of each answer segment, because its hidden state predicts the answer's first token: with that one
extra token the packed layout gives exactly the logits of the classic layout over P + C + R + 1 tokens
instead of 2P + C + R. `labels[t]` is the target predicted from `hidden[t]` (shifted once, here).
`seq_index[t]` says whose log-probability token t counts for: 2j = chosen of the j-th pair of a
micro-batch, 2j + 1 = its rejected, -1 = none. With `prompt_seq` (TrainConfig.nll_tokens="all", TRL's NLL over
prompt + chosen answer) the prompt's positions 0 .. P-2 get labels p1 .. p[P-1] counted for sequence prompt_seq.

A pair whose longer sequence (prompt + the longer answer) exceeds `max_length` has its prompt cut from
the middle (head and tail kept: the chat header and the question survive); the number of such pairs is
counted. A pair whose answers alone leave no room for a prompt of `MIN_PROMPT` tokens is skipped and counted.
"""

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from sealong.data import prompts
from sealong.jsonl import IdChecker, numbered_records

IGNORE = -100
MIN_PROMPT = 8  # fewest prompt tokens kept by middle truncation


@dataclass
class Pair:
    """One tokenized training example (rejected is None in SFT)."""
    id: str
    prompt: torch.Tensor              # [P] int64, chat template applied, generation prompt included
    chosen: torch.Tensor              # [C] int64, ends with EOS
    rejected: torch.Tensor | None     # [R] int64, ends with EOS
    truncated: bool = False           # prompt was cut from the middle to fit max_length
    weight: float = 1.0               # loss weight of the pair (pair_weighting="margin": margin / mean margin)


@dataclass
class Row:
    """One token sequence fed to the model: [T] tensors."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_index: torch.Tensor
    segment_ids: torch.Tensor | None = None   # int32, packed layout only


@dataclass
class PairData:
    pairs: list
    skipped: Counter = field(default_factory=Counter)   # reason -> count
    truncated: int = 0
    weighting: str = "none"  # pair_weighting the weights were set by

    def summary(self):
        parts = [f"{len(self.pairs)} pairs", f"{self.truncated} prompts truncated from the middle"]
        parts += [f"{n} skipped ({reason})" for reason, n in sorted(self.skipped.items())]
        if self.weighting != "none" and self.pairs:
            weights = [p.weight for p in self.pairs]
            parts.append(f"pair weights {self.weighting} / mean ({min(weights):.3g}..{max(weights):.3g})")
        return ", ".join(parts)


def _text_field(record, key, where, required=True):
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def user_message(record, strategy, where):
    """The single user message of the chat: `prompt` as given, or context + question through the strategy."""
    if "prompt" in record:
        return _text_field(record, "prompt", where)
    context = _text_field(record, "context", where)
    question = _text_field(record, "question", where)
    return prompts.user_message(context, question, strategy)


def encode_prompt(tokenizer, message):
    """Token ids of the chat-templated user message with the generation prompt, exactly as the sampler
    encodes it (sealong.data.prompts.chat_token_ids: one BOS; a tokenizer without a chat template is an error)."""
    return torch.tensor(prompts.chat_token_ids(tokenizer, message), dtype=torch.long)


def encode_answer(tokenizer, text):
    """Answer token ids followed by the end-of-turn token (the tokenizer's EOS, else its SEP)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is not None:
        ids = list(ids) + [eos]
    return torch.tensor(ids, dtype=torch.long)


def truncate_middle(ids, length):
    """Keep the first ceil(length/2) and the last floor(length/2) tokens of ids."""
    if ids.numel() <= length:
        return ids
    head = (length + 1) // 2
    return torch.cat([ids[:head], ids[ids.numel() - (length - head):]])


def score_margin(record, where):
    """The record's `score_margin` (a finite number >= 0), or ValueError naming file:line."""
    if is_trl_record(record) and "score_margin" not in record:
        raise ValueError(f"{where}: pair_weighting=margin needs each pair's score_margin, and a TRL-format record "
                         "(prompt / chosen / rejected) has none: use the scoring stage's pairs or pair_weighting=none")
    value = record.get("score_margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: pair_weighting=margin needs a finite score_margin >= 0 (the chosen answer's MBR "
                         f"score minus the rejected one's), got {json.dumps(value)}")
    return value


def margin_weights(margins, path):
    """w_i = m_i / mean(m), the exact ratio (fractions) rounded once: equal margins give exactly 1."""
    if not margins:
        return []
    total = sum(Fraction(m) for m in margins)
    if total == 0:
        raise ValueError(f"{path}: pair_weighting=margin, but every score_margin is 0: no pair would weigh anything")
    return [float(Fraction(m) * len(margins) / total) for m in margins]


def load_pairs(path, tokenizer, *, mode="orpo", max_length=32768, strategy=prompts.DEFAULT_STRATEGY,
               pair_weighting="none"):
    """Read and tokenize every record of `path` -> PairData (pairs in file order, counted skips); with
    pair_weighting="margin" each pair's weight is its score_margin over the mean of the pairs read."""
    if strategy not in prompts.STRATEGIES:
        raise ValueError(f"unknown prompt strategy {strategy!r}; choose one of {', '.join(prompts.STRATEGIES)}")
    if pair_weighting not in ("none", "margin"):
        raise ValueError(f"pair_weighting must be 'none' or 'margin', got {pair_weighting!r}")
    data, margins = PairData(pairs=[], weighting=pair_weighting), []
    check_id = IdChecker(path)
    for number, where, record in preference_records(path):
        if "id" in record:  # optional (the line number stands in); typed and unique when given
            check_id(number, record["id"])
        if record.get("skipped"):
            data.skipped["skipped by the scoring stage"] += 1
            continue
        prompt = None
        if is_trl_record(record):
            prompt, chosen_text, rejected_text = trl_record(tokenizer, record, where, mode)
        else:
            chosen_text = _text_field(record, "chosen_text", where)
            rejected_text = _text_field(record, "rejected_text", where, required=mode == "orpo")
        if not chosen_text.strip() or (mode == "orpo" and not rejected_text.strip()):
            data.skipped["empty chosen or rejected text"] += 1
            continue
        if prompt is None:
            prompt = encode_prompt(tokenizer, user_message(record, strategy, where))
        if prompt.numel() == 0:
            data.skipped["empty prompt"] += 1
            continue
        chosen = encode_answer(tokenizer, chosen_text)
        rejected = encode_answer(tokenizer, rejected_text) if mode == "orpo" else None
        answer = max(chosen.numel(), rejected.numel() if rejected is not None else 0)
        room = max_length - answer
        if room < MIN_PROMPT:
            data.skipped[f"answer longer than max_length - {MIN_PROMPT}"] += 1
            continue
        truncated = prompt.numel() > room
        if truncated:
            prompt = truncate_middle(prompt, room)
            data.truncated += 1
        if pair_weighting == "margin":
            margins.append(score_margin(record, where))
        data.pairs.append(Pair(str(record.get("id", number)), prompt, chosen, rejected, truncated))
    for pair, weight in zip(data.pairs, margin_weights(margins, path)):
        pair.weight = weight
    return data


def check_pairs_file(path, mode="orpo"):
    """What `load_pairs` checks without a tokenizer, for `sealong train` before torchrun starts: the file reads
    (UTF-8, JSON), ids are typed and unique, and sealong records have their text fields. A problem raises
    ValueError / FileNotFoundError naming the file:line; a datasets folder is left to the workers."""
    if os.path.isdir(path):
        return
    check_id = IdChecker(path)
    for number, where, record in preference_records(path):
        if "id" in record:
            check_id(number, record["id"])
        if record.get("skipped") or is_trl_record(record):
            continue
        _text_field(record, "chosen_text", where)
        _text_field(record, "rejected_text", where, required=mode == "orpo")
        user_message(record, prompts.DEFAULT_STRATEGY, where)


# ---------------------------------------------------------------------------------------------------------
# Other formats: JSON, datasets folders, TRL's preference records
# ---------------------------------------------------------------------------------------------------------


def preference_records(path):
    """Yield (number, where, record) for the records of `path`; `where` names the file and line (or record).

    JSON lines (one object a line; any other file name than below), `*.json` (a list of records, a
    `{column: [values]}` table, or either under a "train" key), or a folder written by datasets'
    `save_to_disk` (a Dataset, or a DatasetDict: its "train" split, or its only split)."""
    if os.path.isdir(path):
        yield from _dataset_records(path)
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.endswith(".json"):
        for number, record in numbered_records(path):
            yield number, f"{path}:{number}", record
        return
    with open(path, encoding="utf-8") as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(table, dict) and isinstance(table.get("train"), (list, dict)):
        table = table["train"]
    if isinstance(table, dict) and table and all(isinstance(v, list) for v in table.values()):
        lengths = {len(v) for v in table.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: columns of different lengths {sorted(lengths)}")
        table = [dict(zip(table, values)) for values in zip(*table.values())]
    if not isinstance(table, list):
        raise ValueError(f"{path}: expected a list of records or a table of columns, got {type(table).__name__}")
    for number, record in enumerate(table, 1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {number}: expected an object, got {type(record).__name__}")
        yield number, f"{path}: record {number}", record


def _dataset_records(path):
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"{path} is a folder: reading a datasets folder needs `pip install datasets` ({err})") from None
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise ValueError(f"{path}: not a folder written by datasets' save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"{path}: a DatasetDict with splits {sorted(ds)} and no 'train' split")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for number, record in enumerate(ds, 1):
        yield number, f"{path}: row {number}", record


def is_trl_record(record):
    """TRL's preference format: `chosen` (and `rejected`), no sealong `chosen_text`."""
    return "chosen" in record and "chosen_text" not in record


def _messages(value, where, key):
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              and isinstance(m.get("role"), str) for m in value):
        raise ValueError(f"{where}: field {key!r} must be a list of {{'role', 'content'}} messages with string "
                         f"content, got {json.dumps(value, default=str)[:80]}")
    return value


def _answer_content(messages, where, key):
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"{where}: field {key!r} must hold one assistant message after the prompt, got roles "
                         f"{[m['role'] for m in messages]}")
    return messages[0]["content"]


def trl_record(tokenizer, record, where, mode="orpo"):
    """(prompt ids [P], chosen text, rejected text or None) of a record in TRL's preference format.

    Conversational: `prompt` a list of messages, `chosen` / `rejected` one assistant message each; without
    `prompt` (TRL's implicit prompt) the messages shared by `chosen` and `rejected` are the prompt. The prompt
    goes through the chat template with the generation prompt, as sealong's own records (answers: the
    message content and EOS, as `encode_answer`). Standard: strings, the prompt tokenized as plain text
    (TRL applies no template to strings) with the tokenizer's BOS in front when it has one."""
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    if mode == "orpo" and rejected is None:
        raise ValueError(f"{where}: TRL preference record without 'rejected' (ORPO needs both answers)")
    if isinstance(chosen, list):
        chosen = _messages(chosen, where, "chosen")
        rejected = None if rejected is None else _messages(rejected, where, "rejected")
        if prompt is None:
            shared = 0
            while (rejected is not None and shared < min(len(chosen), len(rejected)) - 1
                   and chosen[shared] == rejected[shared]):
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected and rejected[shared:]
            if not prompt:
                raise ValueError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no leading message")
        prompt = _messages(prompt, where, "prompt")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where}: conversational record, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return (torch.tensor(ids, dtype=torch.long), _answer_content(chosen, where, "chosen"),
                None if rejected is None else _answer_content(rejected, where, "rejected"))
    prompt = _text_field(record, "prompt", where)
    chosen = _text_field(record, "chosen", where)
    rejected = _text_field(record, "rejected", where, required=mode == "orpo")
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return torch.tensor(ids, dtype=torch.long), chosen, rejected


def _answer_labels(answer):
    """Labels of an answer block that starts with the prompt's last token: each token predicts the next."""
    return torch.cat([answer, torch.tensor([IGNORE])])


def pack_pair(pair, index=0, layout="packed", prompt_seq=None):
    """Rows for the j-th pair of a micro-batch (`index` = j): one packed row or two classic rows.

    prompt_seq (optional, an int): the prompt's tokens after the first become labels too, counted for sequence
    `prompt_seq` (TRL's NLL over prompt + chosen answer: the prompt's P - 1 predictions, once per pair; in the
    classic layout on the chosen row)."""
    p, c, r = pair.prompt, pair.chosen, pair.rejected
    P = p.numel()

    def prompt_labels(counted):  # labels and seq_index of the first P - 1 positions
        if prompt_seq is None or not counted:
            return torch.full((P - 1,), IGNORE), torch.full((P - 1,), -1)
        return p[1:], torch.full((P - 1,), prompt_seq)

    if layout == "classic" or r is None:
        rows = []
        for k, answer in enumerate([c] if r is None else [c, r]):
            ids = torch.cat([p, answer])
            head, head_seq = prompt_labels(k == 0)
            tail = _answer_labels(answer)
            seq = torch.cat([head_seq, torch.where(tail != IGNORE, 2 * index + k, -1)])
            rows.append(Row(ids, torch.arange(ids.numel()), torch.cat([head, tail]), seq))
        return rows
    if layout != "packed":
        raise ValueError(f"layout must be 'packed' or 'classic', got {layout!r}")
    last = p[-1:]
    ids = torch.cat([p[:-1], last, c, last, r])
    positions = torch.cat([torch.arange(P - 1), torch.arange(P - 1, P + c.numel()), torch.arange(P - 1, P + r.numel())])
    answers = torch.cat([_answer_labels(c), _answer_labels(r)])
    segments = torch.cat([torch.zeros(P - 1), torch.ones(c.numel() + 1), torch.full((r.numel() + 1,), 2)]).int()
    head, head_seq = prompt_labels(True)
    seq = torch.cat([head_seq, torch.where(answers == IGNORE, -1, 2 * index + segments[P - 1:].long() - 1)])
    return [Row(ids, positions, torch.cat([head, answers]), seq, segments)]


def pad_row(row, multiple, pad_id=0):
    """Pad a row at its end to a multiple of `multiple` tokens (label -100, positions continuing).

    Padding at the end is invisible to every real token under the causal mask, so it changes nothing but
    lets the row split evenly over the sequence-parallel ranks.
    """
    extra = -row.input_ids.numel() % multiple
    if extra == 0:
        return row
    last_pos = int(row.position_ids[-1])
    grow = lambda t, fill: torch.cat([t, torch.full((extra,), fill, dtype=t.dtype)])  # noqa: E731
    positions = torch.cat([row.position_ids, torch.arange(last_pos + 1, last_pos + 1 + extra)])
    segments = None if row.segment_ids is None else grow(row.segment_ids, int(row.segment_ids[-1]))
    return Row(grow(row.input_ids, pad_id), positions, grow(row.labels, IGNORE), grow(row.seq_index, -1), segments)


def prompt_label_count(pair):
    """Prompt tokens a pair adds to the NLL with nll_tokens="all" (pack_pair's prompt_seq): all but the first."""
    return pair.prompt.numel() - 1


def label_counts(pair):
    """(chosen label tokens, rejected label tokens) of a pair: the denominators of its mean log-probs."""
    return pair.chosen.numel(), (pair.rejected.numel() if pair.rejected is not None else 0)
