"""The training objective over a data-parallel x sequence-parallel batch, built on the fused linear loss.

ORPO over the whole optimizer batch of P pairs (the odds-ratio term as TRL's ORPOTrainer,
trl/trainer/orpo_trainer.py; the NLL on the chosen RESPONSE tokens only, as XTuner's ORPO and the paper; TRL's
NLL also covers the prompt: TrainConfig.nll_tokens="all" adds each prompt's P_i - 1 predicted tokens, S_p,i and
n_p,i = P_i - 1, to S_c,i and n_c,i in the NLL below, which with nll_reduction="token" is TRL's NLL exactly):

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
per-micro-batch means). Pair weights w_i (TrainConfig.pair_weighting; Self-Consistency Preference
Optimization, arXiv 2411.04109) multiply pair i's terms while the means stay over the pair / token COUNTS:

    loss = nll_weight * NLL_w - beta * (1/P) sum_i w_i logsigmoid(log_odds_i)
    NLL_w = -sum_i w_i S_c,i / sum_i n_c,i  ("token")       NLL_w = -(1/P) sum_i w_i S_c,i / n_c,i  ("sequence")

still a sum of per-pair terms over fixed batch denominators, so the same shares are exact (each micro-step
passes its own pairs' weights). The logged metrics stay unweighted (TRL's definitions); `loss` is weighted.
S comes from `sealong_kernels.sequence_logp_sums`, the fused kernel (no [T, V]
logits); under sequence parallelism it is given the group, all-reduces each sequence's partial sums with an
identity gradient, and every rank of the group computes the same loss and the exact gradient through its
own tokens (so the loss value is counted once per group, the gradients summed).
"""


import torch

import sealong_kernels as sk
from sealong_kernels.reference import orpo_objective

CPU_CHUNK_BYTES = 128 * 2**20  # logits per chunk on a CPU: 512 rows at V = 49152 float32 (GPUs: the kernel's default)

# TRL's ORPOTrainer metric names, all of them
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "log_odds_ratio", "log_odds_chosen", "nll_loss", "logits/chosen", "logits/rejected")
PAIR_METRICS = ("rewards/accuracies", "logps/chosen", "logps/rejected", "log_odds_ratio", "log_odds_chosen")
# token means: over the batch's chosen (0) or rejected (1) label tokens; every other metric is a mean over pairs
TOKEN_METRICS = {"nll_loss": 0, "logits/chosen": 0, "logits/rejected": 1}


def row_logp_sums(hidden, weight, labels, seq_index, num_seqs, *, bias=None, chunk_size=0, group=None):
    """(per-sequence sums of log p(labels[t] | hidden[t]), per-sequence sums of the mean logit), both float32
    [num_seqs] and summed over `group`; the second is detached (TRL's logits/chosen and logits/rejected, over
    the answer tokens) and comes from the same fused row pass as the first (one definition, no second pass).

    hidden [T, H] (this rank's tokens of one row), weight [V, H], labels [T] (-100: no loss), seq_index [T]
    (sequence 2j / 2j + 1 = chosen / rejected answer of pair j, -1: none). Pass labels and seq_index as built
    (on the host): the entries are found and checked there, so the loss does not wait for the model's forward.
    """
    labels, seq_index = labels.cpu(), seq_index.cpu()
    rows = torch.nonzero(labels != -100).flatten()
    targets, seq = labels[rows], seq_index[rows]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or -100; got {int(targets.min())}..{int(targets.max())}")
    rows, targets, seq = (t.to(hidden.device) for t in (rows, targets, seq))
    # every device: the fused chunked Function (on a CPU without the Triton interpreter its row pass is the torch
    # twin); CPU chunks of CPU_CHUNK_BYTES of logits: no [M, V] tensor, and products of a few hundred rows, which
    # a CPU runs no slower than larger ones
    return sk.sequence_logp_sums(hidden, weight, rows, targets, seq, num_seqs, bias, chunk_size=chunk_size or None,
                                 chunk_bytes=None if hidden.is_cuda else CPU_CHUNK_BYTES, group=group,
                                 return_logit_means=True, checked=True)


def metric_means(sums, batch_pairs, batch_tokens, nll_reduction="token", nll_tokens=None):
    """{name: batch mean} from metric sums [len(METRIC_NAMES)]: TOKEN_METRICS over the batch's label tokens
    batch_tokens = (chosen, rejected), the others over its pairs; nll_loss over pairs with nll_reduction
    "sequence" (each chosen response's token mean, averaged over pairs), else over nll_tokens when given (the
    NLL's tokens: chosen and prompt tokens with TrainConfig.nll_tokens="all")."""
    def denominator(name):
        if name == "nll_loss" and nll_reduction == "token" and nll_tokens is not None:
            return nll_tokens
        if name in TOKEN_METRICS and not (name == "nll_loss" and nll_reduction != "token"):
            return batch_tokens[TOKEN_METRICS[name]]
        return batch_pairs

    return {name: float(sums[i]) / max(denominator(name), 1) for i, name in enumerate(METRIC_NAMES)}


def micro_shares(counts, *, mode, beta, nll_weight, batch_chosen_tokens, batch_pairs, nll_reduction="token",
                 extra_tokens=0, batch_extra_tokens=0):
    """(beta, nll_weight) of a micro-step's share of the batch loss (module docstring), from its host counts
    [2p] (a CPU tensor or list: no device read); extra_tokens / batch_extra_tokens: the NLL's tokens besides the
    chosen answers' in this micro-step / in the batch (the prompts' with nll_tokens="all")."""
    counts = torch.as_tensor(counts).cpu()
    pairs = counts.numel() // 2
    own = float(counts[0::2].sum()) + extra_tokens if nll_reduction == "token" else float(pairs)  # this micro-step's NLL weight ...
    total = batch_chosen_tokens + batch_extra_tokens if nll_reduction == "token" else batch_pairs  # ... of the batch's
    return beta * pairs / batch_pairs, nll_weight * own / total


def micro_objective(sums, counts, *, mode, beta, nll_weight, batch_chosen_tokens, batch_pairs, logit_sums=None,
                    nll_reduction="token", pair_weights=None, counts_dev=None, keep=None, nll_extra=None,
                    batch_extra_tokens=0):
    """This micro-step's share of the batch loss and its metric sums.

    sums [2p] float32 (the global per-sequence log-prob sums of its p pairs), counts [2p] label tokens (on the
    host: the shares are computed there), logit_sums [2p] (optional, the second output of `row_logp_sums`),
    pair_weights [p] (optional, the pairs' loss weights; None: every pair weighs 1, the multiply skipped);
    counts_dev and keep (optional): counts on sums' device and the kept pairs (reference.kept_pairs), given
    where the batch was built: the objective then checks nothing and nothing here reads the device.
    nll_extra (optional): (sums [p], host counts [p]) of the tokens the NLL covers besides the chosen answers'
    (the prompts' with nll_tokens="all"), batch_extra_tokens their number over the batch (orpo_objective's
    nll_extra). Returns (loss share to backpropagate, metrics float64 [len(METRIC_NAMES)] on sums' device,
    summed over the p pairs, except TOKEN_METRICS: summed over their tokens, and nll_loss with nll_reduction
    "sequence": summed over pairs); `metric_means` turns the sums over the batch into means.
    """
    counts = torch.as_tensor(counts)
    counts_host = counts.cpu()  # a no-op for host counts (the training loop's); a device read otherwise
    pairs = counts_host.numel() // 2
    extra_tokens = float(torch.as_tensor(nll_extra[1]).cpu().sum()) if nll_extra is not None else 0.0
    share_beta, share_nll = micro_shares(counts_host, mode=mode, beta=beta, nll_weight=nll_weight,
                                         batch_chosen_tokens=batch_chosen_tokens, batch_pairs=batch_pairs,
                                         nll_reduction=nll_reduction, extra_tokens=extra_tokens,
                                         batch_extra_tokens=batch_extra_tokens)
    own = float(counts_host[0::2].sum()) + extra_tokens if nll_reduction == "token" else float(pairs)
    if counts_dev is None:
        counts_dev = counts.to(sums.device)
    loss, m = orpo_objective(sums, counts_dev, mode=mode, beta=share_beta, nll_weight=share_nll,
                             nll_reduction=nll_reduction, pair_weights=pair_weights, keep=keep, nll_extra=nll_extra)
    out = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=sums.device)
    index = METRIC_NAMES.index
    out[index("nll_loss")] = m["nll_loss"].double() * own
    out[index("logps/chosen")] = m["logps/chosen"].double() * pairs
    if logit_sums is not None:
        z = logit_sums.detach().double()
        out[index("logits/chosen")] = z[0::2].sum()
        if mode == "orpo":
            out[index("logits/rejected")] = z[1::2].sum()
    if mode == "orpo":
        for name in PAIR_METRICS:
            out[index(name)] = m[name].double() * pairs
        # rewards are beta * logps with the true beta (the share above scales beta)
        lc, lr = out[index("logps/chosen")], out[index("logps/rejected")]
        out[0], out[1], out[3] = beta * lc, beta * lr, beta * (lc - lr)
    return loss, out
