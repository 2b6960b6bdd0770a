"""The training objective over a data-parallel x sequence-parallel batch, built on the fused linear loss.

ORPO over the whole optimizer batch of P pairs (the odds-ratio term as TRL's ORPOTrainer,
trl/trainer/orpo_trainer.py; the NLL on the chosen RESPONSE tokens only, as XTuner's ORPO and the paper; TRL's
NLL also covers the prompt):

    loss = nll_weight * NLL - beta * mean_i logsigmoid(log_odds_i)
    NLL  = -sum_i S_c,i / sum_i n_c,i          nll_reduction="token": a token mean over the batch's chosen tokens
    NLL  = -mean_i (S_c,i / n_c,i)             nll_reduction="sequence": each chosen response's token mean,
                                               averaged over pairs (XTuner, one pair per micro-step: the authors')

where S is a sequence's sum of log p(label) and n its number of label tokens. Both are exact over the whole
batch, whatever the micro-batching and the number of ranks: a micro-step holding p of the P pairs and N_c of
their chosen tokens contributes exactly its share

    reference.orpo_objective(S, n, beta = beta * p / P,
                             nll_weight = nll_weight * N_c / N_c,batch   ("token")
                                          nll_weight * p / P             ("sequence"))

so the gradients summed over micro-steps and over every rank are those of the batch loss (no averaging of
per-micro-batch means). S comes from `sealong_kernels.sequence_logp_sums`, the fused kernel (no [T, V]
logits); under sequence parallelism it is given the group, all-reduces each sequence's partial sums with an
identity gradient, and every rank of the group computes the same loss and the exact gradient through its
own tokens (so the loss value is counted once per group, the gradients summed).
"""

import os

import torch

import sealong_kernels as sk
from sealong_kernels import reference
from sealong_kernels.reference import orpo_objective

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "log_odds_ratio", "log_odds_chosen", "nll_loss")
PAIR_METRICS = ("rewards/accuracies", "logps/chosen", "logps/rejected", "log_odds_ratio", "log_odds_chosen")


def row_logp_sums(hidden, weight, labels, seq_index, num_seqs, *, bias=None, chunk_size=0, group=None):
    """Per-sequence sums of log p(labels[t] | hidden[t]) -> float32 [num_seqs], summed over `group`.

    hidden [T, H] (this rank's tokens of one row), weight [V, H], labels [T] (-100: no loss), seq_index [T]
    (sequence 2j / 2j + 1 = chosen / rejected answer of pair j, -1: none).
    """
    rows = torch.nonzero(labels != -100).flatten()
    if hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return sk.sequence_logp_sums(hidden, weight, rows, labels[rows], seq_index[rows], num_seqs, bias,
                                     chunk_size=chunk_size or None, group=group)
    # CPU without the Triton interpreter: the plain-torch twin (full logits of the label rows only)
    sums = reference.sequence_logp_sums(hidden, weight, rows, labels[rows], seq_index[rows], num_seqs, bias)
    return reference.global_sum(sums.float(), group)


def micro_objective(sums, counts, *, mode, beta, nll_weight, batch_chosen_tokens, batch_pairs,
                    nll_reduction="token"):
    """This micro-step's share of the batch loss and its metric sums.

    sums [2p] float32 (the global per-sequence log-prob sums of its p pairs), counts [2p] label tokens.
    Returns (loss share to backpropagate, metrics float64 [len(METRIC_NAMES)] summed over the p pairs, except
    nll_loss with nll_reduction="token": summed over chosen tokens). Divide by the batch's pairs (or, for
    nll_loss with "token", its chosen tokens: `nll_denominator`) to get the batch means.
    """
    pairs = counts.numel() // 2
    chosen_tokens = float(counts[0::2].sum())
    own = chosen_tokens if nll_reduction == "token" else float(pairs)  # this micro-step's NLL weight ...
    total = batch_chosen_tokens if nll_reduction == "token" else batch_pairs  # ... of the batch's
    loss, m = orpo_objective(sums, counts, mode=mode, beta=beta * pairs / batch_pairs,
                             nll_weight=nll_weight * own / total, nll_reduction=nll_reduction)
    out = torch.zeros(len(METRIC_NAMES), dtype=torch.float64)
    out[METRIC_NAMES.index("nll_loss")] = float(m["nll_loss"]) * own
    out[METRIC_NAMES.index("logps/chosen")] = float(m["logps/chosen"]) * pairs
    if mode == "orpo":
        for name in PAIR_METRICS:
            out[METRIC_NAMES.index(name)] = float(m[name]) * pairs
        # rewards are beta * logps with the true beta (the share above scales beta)
        lc, lr = out[METRIC_NAMES.index("logps/chosen")], out[METRIC_NAMES.index("logps/rejected")]
        out[0], out[1], out[3] = beta * lc, beta * lr, beta * (lc - lr)
    return loss, out


def nll_denominator(nll_reduction, batch_chosen_tokens, batch_pairs):
    """What the summed nll_loss metric of a batch is divided by: its chosen tokens ("token") or pairs."""
    return batch_chosen_tokens if nll_reduction == "token" else batch_pairs
