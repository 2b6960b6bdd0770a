"""TRL integration: ORPO on sealong's fused linear loss, never materializing [B, T, V] logits.

TRL is optional (`pip install sealong[trl]`) and imported only when the trainer is first used:

    from trl.experimental.orpo import ORPOConfig            # TRL >= 1.0 (older TRL: from trl import ORPOConfig)
    from sealong_kernels.trl import ORPOTrainer             # a subclass of TRL's ORPOTrainer
    trainer = ORPOTrainer(model=model, args=ORPOConfig(...), train_dataset=ds, processing_class=tokenizer)

`ORPOTrainer` overrides `concatenated_forward` and `get_batch_loss_metrics` in the manner of Liger-Kernel's
LigerORPOTrainer (liger_kernel/transformers/trainer/orpo_trainer.py): the model runs without its LM head,
and `self.orpo_loss_fn` (a `LigerORPOLoss`; any object with Liger's call signature may replace it) computes
the loss from the last hidden states and the head's weight. Every other TRL feature (data processing, PEFT,
evaluation, logging, the MoE auxiliary loss) is TRL's own, and the logged metrics carry TRL's names.

`LigerORPOLoss` has the call signature and return shape of Liger's LigerFusedLinearORPOLoss (no TRL needed):

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen) = loss_fn(
        lm_head.weight, hidden, target, lm_head.bias, nll_target=nll_target)

Math (TRL's ORPOTrainer, trl/experimental/orpo/orpo_trainer.py). hidden [2B, T, H]: rows 0..B-1 chosen,
B..2B-1 rejected, row b pairs with row B + b; target [2B, T] and nll_target [2B, T]: target[r, t] is the token
predicted from hidden[r, t] (shifted by the caller), -100 = none. With logp = log softmax(W h + b)[y]:

    c_b, r_b   = mean logp over the target tokens of chosen / rejected row b
    nll        = -(sum of logp over the nll_target tokens of the chosen rows) / (their number)
                 (TRL: every non-padding token of prompt + answer; nll_target=None: the target tokens)
    log_odds_b = (c_b - r_b) - (log(1 - e^c_b) - log(1 - e^r_b))
    loss       = nll - beta * mean_b logsigmoid(log_odds_b)
    logits/chosen = mean of W h + b over the chosen rows, every position and vocabulary entry
                  = mean_{b, t}(h_bt) . mean_v(W_v) + mean_v(b_v)          (no logits: [H] vectors)

Every log-probability comes from one call of `sealong_kernels.sequence_logp_sums` (the fused kernel: at most
one [chunk, V] logits tensor at a time) over 4 sums per pair: chosen tokens counted by both target and
nll_target, chosen tokens of target only, rejected tokens, chosen tokens of nll_target only. A token that
both count is computed once. The odds-ratio term is `reference.orpo_objective`'s.
"""

import torch

from .orpo import sequence_logp_sums
from .reference import orpo_objective

SUMS_PER_PAIR = 4  # chosen (target and nll), chosen (target only), rejected, chosen (nll only)


def preference_entries_with_nll(target, nll_target=None, ignore_index=-100):
    """Loss entries (rows [M], targets [M], seq [M]) into hidden.reshape(-1, H) for TRL's two label sets.

    target, nll_target [2B, T] (classic layout). seq = 4 b + k with k = 0: chosen row b, a target token that
    nll_target counts too (same label); 1: chosen, target only; 2: rejected, target; 3: chosen, nll only."""
    if target.dim() != 2 or target.shape[0] % 2:
        raise ValueError(f"target must be [2B, T] (B chosen rows, then B rejected rows), got {tuple(target.shape)}")
    if nll_target is not None and nll_target.shape != target.shape:
        raise ValueError(f"nll_target must have target's shape {tuple(target.shape)}, got {tuple(nll_target.shape)}")
    two_b, t = target.shape
    pairs = two_b // 2
    flat = target.reshape(-1)
    row = torch.arange(flat.numel(), device=flat.device) // t
    chosen = row < pairs
    pair = row % pairs
    in_target = flat != ignore_index
    if nll_target is None:
        flat_nll, in_nll = flat, in_target & chosen
    else:
        flat_nll = nll_target.reshape(-1).to(flat.device)
        in_nll = (flat_nll != ignore_index) & chosen
    shared = in_target & in_nll & (flat == flat_nll)
    kind = torch.where(chosen, torch.where(shared, 0, 1), 2)
    first = in_target.nonzero()[:, 0]
    extra = (in_nll & ~shared).nonzero()[:, 0]
    rows = torch.cat([first, extra])
    targets = torch.cat([flat[first], flat_nll[extra]]).long()
    seq = torch.cat([SUMS_PER_PAIR * pair[first] + kind[first], SUMS_PER_PAIR * pair[extra] + 3])
    return rows, targets, seq, pairs


def mean_logits(hidden, weight, bias=None):
    """Mean of hidden @ weight.T + bias over every row and vocabulary entry, without the logits:
    mean(h) . mean_v(W_v) + mean(b) in float32."""
    value = hidden.detach().reshape(-1, hidden.shape[-1]).float().mean(0) @ weight.detach().float().mean(0)
    return value + (bias.detach().float().mean() if bias is not None else 0.0)


def head_dtype(hidden, weight, bias=None):
    """(hidden, weight, bias) in one dtype, as the LM head would compute: the autocast dtype under mixed
    precision (TRL's bf16=True: bfloat16 hidden states, float32 weights), else the weight's dtype."""
    if hidden.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype):
        return hidden, weight, bias
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def fused_linear_orpo_trl(hidden, weight, target, bias=None, nll_target=None, *, beta=0.1, compute_nll_loss=True,
                          ignore_index=-100, chunk_size=None, strategy="auto"):
    """TRL's ORPO loss (module docstring) on hidden [2B, T, H] (or [2B * T, H]) and the LM head weight [V, H].

    Returns (loss, metrics): metrics holds TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected, nll_loss, log_odds_ratio,
    log_odds_chosen) as batch means, and the per-pair float32 [B] tensors chosen_logps / rejected_logps."""
    rows, targets, seq, pairs = preference_entries_with_nll(target.to(hidden.device), nll_target, ignore_index)
    hidden, weight, bias = head_dtype(hidden, weight, bias)
    hidden3 = hidden.reshape(target.shape[0], target.shape[1], hidden.shape[-1])
    sums = sequence_logp_sums(hidden3, weight, rows, targets, seq, SUMS_PER_PAIR * pairs, bias,
                              chunk_size=chunk_size, strategy=strategy).reshape(pairs, SUMS_PER_PAIR)
    counts = torch.bincount(seq, minlength=SUMS_PER_PAIR * pairs).reshape(pairs, SUMS_PER_PAIR)
    per_sequence = torch.stack([sums[:, 0] + sums[:, 1], sums[:, 2]], 1).reshape(-1)
    per_sequence_counts = torch.stack([counts[:, 0] + counts[:, 1], counts[:, 2]], 1).reshape(-1)
    # the odds-ratio term alone (nll_weight 0); TRL's NLL counts nll_target's tokens instead of the target's
    loss, metrics = orpo_objective(per_sequence, per_sequence_counts, beta=beta, nll_weight=0.0)
    nll_tokens = counts[:, 0].sum() + counts[:, 3].sum()
    if nll_tokens == 0 and compute_nll_loss:
        raise ValueError("nll_target has no token (all ignore_index) on the chosen rows: the NLL term is undefined")
    nll = -(sums[:, 0].sum() + sums[:, 3].sum()) / nll_tokens.clamp(min=1)
    if compute_nll_loss:
        loss = loss + nll
    n = per_sequence_counts.reshape(pairs, 2).float()
    logps = per_sequence.detach().reshape(pairs, 2) / n
    metrics.update({
        "nll_loss": nll.detach().float(),
        "logits/chosen": mean_logits(hidden3[:pairs], weight, bias),
        "logits/rejected": mean_logits(hidden3[pairs:], weight, bias),
        "chosen_logps": logps[:, 0], "rejected_logps": logps[:, 1],
    })
    metrics.pop("skipped_pairs", None)
    return loss, metrics


class LigerORPOLoss(torch.nn.Module):
    """Liger-Kernel's LigerFusedLinearORPOLoss interface (its __init__ keywords and forward signature) on
    sealong's fused kernel: `forward(lin_weight, _input, target, bias=None, nll_target=None)` returns
    (loss, (chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards [B], rejected_rewards [B], log_odds_ratio, log_odds_chosen)), detached extras.

    `compiled` is accepted and ignored (nothing here is torch.compile'd); `chunk_size` is sealong's: loss tokens
    per logits chunk (None: about 512 MiB of logits; Liger's is pairs per chunk). `strategy`: see
    sealong_kernels.orpo ("auto", "deferred", "recompute")."""

    def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=True, compiled=True, chunk_size=None,
                 strategy="auto"):
        super().__init__()
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss
        self.compiled, self.chunk_size, self.strategy = compiled, chunk_size, strategy

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        loss, m = fused_linear_orpo_trl(_input, lin_weight, target, bias, nll_target, beta=self.beta,
                                        compute_nll_loss=self.compute_nll_loss, ignore_index=self.ignore_index,
                                        chunk_size=self.chunk_size, strategy=self.strategy)
        chosen, rejected = m["chosen_logps"], m["rejected_logps"]
        return loss, (chosen, rejected, m["logits/chosen"], m["logits/rejected"], m["nll_loss"],
                      self.beta * chosen, self.beta * rejected, m["log_odds_ratio"], m["log_odds_chosen"])

    def extra_repr(self):
        return f"beta={self.beta}, ignore_index={self.ignore_index}, chunk_size={self.chunk_size}"


# ---------------------------------------------------------------------------------------------------------
# The trainer: built on first access (module __getattr__), so importing this module needs no TRL
# ---------------------------------------------------------------------------------------------------------


def _trl_orpo_trainer():
    """TRL's ORPOTrainer class (trl.experimental.orpo since TRL 1.0, trl before)."""
    try:
        import trl
    except ImportError as err:
        raise ImportError("sealong_kernels.trl.ORPOTrainer needs TRL: pip install 'sealong[trl]' "
                          f"(or pip install trl); import failed: {err}") from err
    try:
        from trl.experimental.orpo import ORPOTrainer
    except ImportError:
        ORPOTrainer = getattr(trl, "ORPOTrainer", None)
        if ORPOTrainer is None:
            raise ImportError(f"TRL {trl.__version__} has no ORPOTrainer (looked in trl.experimental.orpo and trl)")
    return ORPOTrainer


def hidden_states(model, input_ids, attention_mask, **model_kwargs):
    """(last hidden states [N, T, H] after the final norm, model outputs, LM head module) without logits.

    The call goes through `model` itself (PEFT, DDP and accelerate wrappers stay in the path) with
    `logits_to_keep` an empty index, so the head projects no position, and a forward hook on the decoder
    catches its output. Models without `logits_to_keep` get their decoder called directly (as Liger does)."""
    import inspect

    inner = model
    while hasattr(inner, "module"):  # DataParallel / DistributedDataParallel
        inner = inner.module
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT: the model with adapters
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is base or head is None:
        raise TypeError(f"{type(base).__name__}: no separate decoder and LM head (get_decoder / get_output_embeddings)")
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        out = decoder(input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        return out[0], out, head
    caught = []
    hook = decoder.register_forward_hook(lambda module, args, out: caught.append(out))
    try:
        none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        outputs = model(input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=none, **model_kwargs)
    finally:
        hook.remove()
    return caught[-1][0], outputs, head


def _make_trainer_class():
    base = _trl_orpo_trainer()

    class ORPOTrainer(base):
        """TRL's ORPOTrainer with sealong's fused linear ORPO loss (module docstring): same arguments, same
        loss and metrics as TRL's, no [B, T, V] logits. Decoder-only models; `self.orpo_loss_fn` may be
        replaced by any object with Liger's LigerFusedLinearORPOLoss call signature."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.is_encoder_decoder:
                raise ValueError("sealong_kernels.trl.ORPOTrainer supports decoder-only models; use TRL's ORPOTrainer")
            self.orpo_loss_fn = LigerORPOLoss(beta=self.beta)

        def concatenated_forward(self, model, batch):
            """(loss, Liger's extras tuple) of the concatenated chosen + rejected batch."""
            cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                           device=self.accelerator.device)
            ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
            kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
            hidden, outputs, head = hidden_states(model, ids, mask, **kwargs)
            # TRL: logps over the answer labels, the NLL over every non-padding token (prompt and answer)
            nll_target = torch.where(mask == 1, ids, -100)[:, 1:]
            loss, extras = self.orpo_loss_fn(head.weight, hidden[:, :-1], cat["concatenated_labels"][:, 1:],
                                             head.bias, nll_target=nll_target)
            if self.aux_loss_enabled:
                loss = loss + self.aux_loss_coef * outputs.aux_loss
            return loss, extras

        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            """TRL's loss and metrics (names, eval_ prefix, gathering across processes) from the fused loss."""
            loss, extras = self.concatenated_forward(model, batch)
            chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll, chosen_rewards, rejected_rewards, \
                log_odds_ratio, log_odds_chosen = extras[:9]
            gather = self.accelerator.gather_for_metrics
            values = {
                "rewards/chosen": gather(chosen_rewards),
                "rewards/rejected": gather(rejected_rewards),
                "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()),
                "rewards/margins": gather(chosen_rewards - rejected_rewards),
                "logps/rejected": gather(rejected_logps),
                "logps/chosen": gather(chosen_logps),
                "logits/rejected": gather(rejected_logits.reshape(1)),
                "logits/chosen": gather(chosen_logits.reshape(1)),
                "nll_loss": gather(nll.reshape(1)),
                "log_odds_ratio": gather(log_odds_ratio.reshape(1)),
                "log_odds_chosen": gather(log_odds_chosen.reshape(1)),
            }
            prefix = "eval_" if train_eval == "eval" else ""
            return loss, {prefix + k: v.detach().float().mean().item() for k, v in values.items()}

    ORPOTrainer.__module__ = __name__
    return ORPOTrainer


_TRAINER = []


def __getattr__(name):
    if name == "ORPOTrainer":
        if not _TRAINER:
            _TRAINER.append(_make_trainer_class())
        return _TRAINER[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LigerORPOLoss", "ORPOTrainer", "fused_linear_orpo_trl", "hidden_states", "mean_logits",
           "preference_entries_with_nll"]
