"""One micro-step of training: its batch built once on the host, then the model and the one-pass fused loss.

`build_micro_batch` runs before any forward of the optimizer step (`train_step` builds every micro-step of
the step first): it lays out the pairs (sealong/train/pairs.py), takes this rank's shard of each row, finds
the loss entries (labeled tokens) on the host, checks them (labels in [0, V), every response non-empty,
pair weights finite and >= 0), sorts them by sequence and copies everything the device needs. The
micro-step then synchronizes nothing: `micro_step_loss` runs the model on each row and the one-pass fused
ORPO / SFT loss (sealong_kernels.orpo_onepass: 3 matrix products per chunk with a trained head, 2 with a
frozen one, every gradient computed in the loss forward) on the rows' hidden states, and returns the loss
share and the metric sums as device tensors (the caller reads them once per optimizer step).

Rows of one micro-step (two classic rows per pair, or several pairs) are concatenated along the tokens
before the loss, so that a pair's chosen and rejected entries meet in one call (the one-pass loss needs a
pair's whole sums to know its gradient); one packed row (the paper's setting, one pair per micro-step)
is used as is. A trained head under sequence parallelism over several pairs would need two [V, H] float32
accumulators per sequence in the one-pass loss: there the two-pass `row_logp_sums` path runs instead (its
entries still come from the host rows, its metrics are device tensors too).
"""

from dataclasses import dataclass

import torch

from sealong_kernels import orpo_onepass, reference
from sealong_kernels.orpo import _chunk_rows
from sealong_kernels.reference import orpo_objective

from .loss import micro_objective, micro_shares, row_logp_sums
from .pairs import IGNORE, label_counts, pack_pair, prompt_label_count


@dataclass
class MicroBatch:
    """A micro-step's pairs, laid out and checked: `rows` this rank's shards on the device (input_ids,
    position_ids, segment_ids), `host_rows` the same shards on the host (labels and seq_index for the two-pass
    path), counts [2p] the global label tokens per sequence (host), loss the one-pass entries (None: two-pass),
    tokens this rank's model tokens, weights [p] (device float64) or None, prompt_counts [p] (host) the prompts'
    label tokens with nll_tokens="all" (TRL's NLL over prompt + chosen answer: sequences 2p + j), else None."""
    pairs: list
    rows: list
    host_rows: list
    counts: torch.Tensor
    counts_dev: torch.Tensor
    keep: torch.Tensor
    loss: orpo_onepass.LossBatch | None
    tokens: int
    weights: torch.Tensor | None
    prompt_counts: torch.Tensor | None = None


def sequence_counts(pairs):
    """Label tokens of each sequence [2p]: chosen and rejected of every pair (rejected 0 in SFT)."""
    return torch.tensor([n for pair in pairs for n in label_counts(pair)], dtype=torch.long)


def pair_weights(pairs, cfg):
    """The loss weights [p] of a micro-batch's pairs (float64, set by load_pairs, checked), or None with
    pair_weighting="none" (the loss then skips the multiply)."""
    if cfg.pair_weighting == "none":
        return None
    return reference.check_pair_weights(torch.tensor([pair.weight for pair in pairs], dtype=torch.float64), len(pairs))


def _device_row(row, device):
    to_dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to_dev(row.input_ids), to_dev(row.position_ids), to_dev(row.segment_ids)


def build_micro_batch(pairs, cfg, mesh, device, lm_head):
    """The MicroBatch of `pairs` on this rank (host work and host-to-device copies only; see the module
    docstring). lm_head: labels are checked against its rows; a trained head under sequence parallelism over
    several pairs selects the two-pass path, and so does nll_tokens="all" (the prompts' NLL sequences 2p + j)."""
    vocab = lm_head.weight.shape[0]
    with_prompts = cfg.nll_tokens == "all"
    host_rows = [mesh.shard_row(row) for j, pair in enumerate(pairs)
                 for row in pack_pair(pair, j, cfg.layout, prompt_seq=2 * len(pairs) + j if with_prompts else None)]
    counts = sequence_counts(pairs)
    prompt_counts = torch.tensor([prompt_label_count(p) for p in pairs], dtype=torch.long) if with_prompts else None
    keep = reference.kept_pairs(counts, cfg.mode)  # raises on an empty response, naming the pair
    weights = pair_weights(pairs, cfg)
    entries, offset = [], 0
    for row in host_rows:
        idx = torch.nonzero(row.labels != IGNORE).flatten()
        entries.append((idx + offset, row.labels[idx], row.seq_index[idx]))
        offset += row.labels.numel()
    rows, targets, seq = (torch.cat(parts) for parts in zip(*entries))
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE}; got {int(targets.min())}..{int(targets.max())}")
    n_seq = (3 if with_prompts else 2) * len(pairs)
    if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) >= n_seq):
        raise ValueError(f"seq_index of a labeled token must be in [0, {n_seq}); got {int(seq.min())}..{int(seq.max())}")
    order = torch.argsort(seq, stable=True)
    rows, targets, seq = rows[order], targets[order], seq[order]
    local = torch.bincount(seq, minlength=n_seq)
    want = counts if prompt_counts is None else torch.cat([counts, prompt_counts])
    if mesh.sp == 1 and not torch.equal(local, want):  # the loss denominators are the rows' label tokens
        raise ValueError(f"label tokens per sequence {local.tolist()} differ from the pairs' counts {want.tolist()}")
    counts_dev = counts.to(device)
    keep_dev = keep.to(device)
    weights_dev = None if weights is None else weights.to(device)
    loss = None
    if not with_prompts and not orpo_onepass.trains_head_under_group(lm_head.weight, lm_head.bias, mesh.sp_group,
                                                                      len(pairs)):
        loss = orpo_onepass.LossBatch(rows.to(device), targets.to(device), seq.to(device), counts.tolist(), counts_dev,
                                      local.tolist(), keep_dev, len(pairs), cfg.mode, False, weights_dev)
    return MicroBatch(pairs, [_device_row(r, device) for r in host_rows], host_rows, counts, counts_dev, keep_dev,
                      loss, sum(r.input_ids.numel() for r in host_rows), weights_dev, prompt_counts)


def micro_step_loss(model, lm_head, micro, cfg, mesh, batch_chosen_tokens, batch_pairs, batch_prompt_tokens=0):
    """(loss share to backpropagate, metric sums float64 [len(METRIC_NAMES)]) of one MicroBatch, both device
    tensors: the model on each row, then `micro_loss`."""
    hiddens = [model(ids, pos, attention=mesh.attention, segment_ids=seg) for ids, pos, seg in micro.rows]
    return micro_loss(hiddens, lm_head, micro, cfg, mesh.sp_group, batch_chosen_tokens, batch_pairs,
                      batch_prompt_tokens)


def micro_loss(hiddens, lm_head, micro, cfg, group, batch_chosen_tokens, batch_pairs, batch_prompt_tokens=0):
    """The loss share and metric sums of a MicroBatch from its rows' hidden states (one [T_row, H] per row of
    micro.rows), with no host synchronization on the one-pass path (`micro_objective` has the shares and the
    metrics; tests/sealong/test_train_syncs.py counts syncs and products)."""
    hiddens = [h.reshape(-1, h.shape[-1]) for h in hiddens]
    options = dict(mode=cfg.mode, beta=cfg.beta, nll_weight=cfg.nll_weight, batch_chosen_tokens=batch_chosen_tokens,
                   batch_pairs=batch_pairs, nll_reduction=cfg.nll_reduction, pair_weights=micro.weights,
                   counts_dev=micro.counts_dev, keep=micro.keep)
    weight, bias = lm_head.weight, lm_head.bias
    if micro.loss is None:  # two-pass: per-row sums, then the objective in autograd
        p = len(micro.pairs)
        n_seq = 2 * p if micro.prompt_counts is None else 3 * p
        sums = logit_sums = 0
        for hidden, row in zip(hiddens, micro.host_rows):
            s, z = row_logp_sums(hidden, weight, row.labels, row.seq_index, n_seq, bias=bias,
                                 chunk_size=cfg.loss_chunk_size, group=group)
            sums, logit_sums = sums + s, logit_sums + z
        if micro.prompt_counts is not None:  # TRL's NLL: the prompts' sums join the chosen answers' in the NLL
            options.update(nll_extra=(sums[2 * p:], micro.prompt_counts), batch_extra_tokens=batch_prompt_tokens)
            sums, logit_sums = sums[:2 * p], logit_sums[:2 * p]
        return micro_objective(sums, micro.counts, logit_sums=logit_sums, **options)
    hidden = hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens)
    beta, nll_weight = micro_shares(micro.counts, mode=cfg.mode, beta=cfg.beta, nll_weight=cfg.nll_weight,
                                    batch_chosen_tokens=batch_chosen_tokens, batch_pairs=batch_pairs,
                                    nll_reduction=cfg.nll_reduction)
    chunk = _chunk_rows(micro.loss.rows.shape[0], weight, hidden.dtype, cfg.loss_chunk_size or None, None)

    def objective(sums):
        return orpo_objective(sums, micro.counts_dev, mode=cfg.mode, beta=beta, nll_weight=nll_weight,
                              nll_reduction=cfg.nll_reduction, pair_weights=micro.weights, keep=micro.keep)[0]

    loss, sums, zsums = orpo_onepass.onepass_loss(hidden, weight, bias, micro.loss, objective, chunk, group)
    with torch.no_grad():
        _, metrics = micro_objective(sums, micro.counts, logit_sums=zsums / weight.shape[0], **options)
    return loss, metrics
