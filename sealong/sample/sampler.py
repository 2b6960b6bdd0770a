"""N samples per long prompt over one shared prefix: the sampling stage of SEALONG.

Each prompt is prefilled once (in chunks) and its KV cache kept once; the samples decoding at once attend
to their prompt's prefix as one matrix product per prompt and to their own suffix, merged exactly by
log-sum-exp (see sealong/sample/kv_cache.py). HF `generate(num_return_sequences=N)` instead prefills and
caches the prompt N times. Continuous batching (`stream`): a fixed number of decode slots, each finished
sample's slot going to the next waiting sample, so the batch stays full; optional CUDA graphs of the decode
step (graphs.py); data-parallel over torchrun ranks with one shard file per rank (shards.py).

Randomness is counter-based: sample i of prompt `id` draws its uniform number at step t from
hash(seed, id, i) and t alone, so the same seed gives the same output whatever else is in the batch
(exactly so where the logits are batch-invariant, as on the CPU in float32 at a fixed number of slots).

    python -m sealong.sampler --model CKPT --prompts run/prompts.jsonl --output run/samples.jsonl \\
        --num-samples 32 --temperature 0.7 --max-new-tokens 1024 [--decode-slots 64] [--nproc-per-node 8]

Reads prompts JSONL (`id`, `context`, `question`, other fields kept) and appends one samples record per
prompt: `id`, `question`, `outputs`, `num_tokens`, `finish_reasons` ("stop" | "length"), `logprob_sum`,
`logprob_count` (log-probabilities of the sampled tokens under the model's own distribution, temperature 1,
EOS included), `self_certainty` (per output: the mean over its tokens of KL(U || p_t), Kang et al. 2025,
arXiv 2502.18581; `Completion.self_certainty`), `prompt_tokens`, `truncated`, `sampler` (the settings that
made it: model and its config hash, N, temperature, top-p/k, seed, ...), plus the prompt record's other fields
except `context`. With --adaptive-block k, a prompt's samples are drawn k at a time and it stops once its
answers agree (`adaptive_rule`): `outputs` holds the samples spent (the first ones of the fixed-N run) and
`adaptive_stop` says why ("consensus" or "budget"). The settings are
also in `<output>.meta.json` (sealong.provenance); a resume under other settings is refused, naming them. Every
prompt's length is checked before sampling. Records are appended to OUTPUT.shard-RANK as prompts finish and
merged into OUTPUT in prompt order at the end (shards.py); resumable by id (a killed run's shards are merged
first; a torn last line is cut off). Rank 0 holds OUTPUT's lock (sealong.lock) for the whole run.
"""

import hashlib
import itertools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from sealong.config.stages import SampleConfig

from sealong.model.sdpa import prefix_decode_sdpa

from .cpu_decode import decode_step_sdpa
from .kv_cache import DecodeBatch, PrefixPool, SuffixCache, decode_step, prefill, prefix_attention_fn

log = logging.getLogger("sealong.sample")

MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    """The decoder's settings; the defaults are the `sample` stage's (SampleConfig, sealong/config/stages.py: the one
    place they and their help are written)."""

    max_new_tokens: int = SampleConfig.max_new_tokens  # then finish reason "length"
    temperature: float = SampleConfig.temperature  # 0 = greedy (argmax)
    top_p: float = SampleConfig.top_p  # nucleus: the smallest set of top tokens with probability >= top_p
    top_k: int = SampleConfig.top_k  # the k most likely tokens (0 = all)
    eos_token_ids: tuple = ()  # any of these ends a sample with finish reason "stop" (the token is counted)
    prefill_chunk: int = SampleConfig.prefill_chunk  # prompt tokens per prefill forward
    backend: str = SampleConfig.backend  # "auto" (Triton kernels on CUDA, reference on CPU), "triton", "reference"
    decode_slots: int = 0  # samples decoded together (continuous batching); 0 = all samples of a generate() call
    prefix_pool_tokens: int = SampleConfig.prefix_pool_tokens  # most prompt tokens in the prefix pool (0 = no limit)
    cuda_graphs: bool = SampleConfig.cuda_graphs  # replay the decode step from CUDA graphs (CUDA only; graphs.py)
    stats: dict = field(default_factory=lambda: {"prefill_tokens": 0, "decode_tokens": 0, "decode_steps": 0,
                                                 "busy_slot_steps": 0, "slot_steps": 0})

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.prefill_chunk < 1 or self.decode_slots < 0 or self.prefix_pool_tokens < 0:
            raise ValueError("max_new_tokens and prefill_chunk must be >= 1, decode_slots and prefix_pool_tokens >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, {self.top_p}, {self.top_k}")
        if self.backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {self.backend!r}")


# ---------------------------------------------------------------------------------------------- randomness


def sample_seed(seed: int, prompt_id: str, index: int) -> int:
    """A 63-bit seed for sample `index` of prompt `prompt_id`, stable across runs and batch compositions."""
    digest = hashlib.blake2b(f"{seed}\x00{prompt_id}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _signed(x):
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x, s):
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """Counter-based U[0, 1) float64 per row: splitmix64(seed + golden * (step + 1)), 53 bits."""
    return _uniform_from(seeds + _signed((0x9E3779B97F4A7C15 * (step + 1)) & MASK64))


def _uniform_from(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output mix of z = seed + golden * (step + 1) (int64, wrapping) -> U[0, 1) float64."""
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def choose_tokens(logits: torch.Tensor, u: torch.Tensor, p: SamplingParams, certainty: bool = False):
    """logits [M, V], u [M] -> (tokens [M] int64, log-prob of each token under softmax(logits) [M] float32),
    and with `certainty` a third [M]: each row's KL(U || p) (self-certainty, see `self_certainty`).

    The rule (`choose_tokens_reference` writes it with a full sort): temperature, then top-k, then top-p on the
    distribution sorted by descending logit (ties: the lower token id first); the token is the inverse CDF at u
    of the kept tokens' renormalized probabilities in vocabulary order. Without top-k / top-p nothing is sorted
    (transformers' sampling does not sort then either); with top-k the k candidates are a `topk` selection, and
    top-p sorts only candidates (the top 256, doubled while they hold less than top_p of the mass). The
    log-probabilities are of the model's own distribution (temperature 1), in float32 (float64 logits stay
    float64), from one logsumexp: no [M, V] log-softmax is kept.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    if p.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        z = logits / p.temperature if p.temperature != 1 else logits
        ids, probs = _kept_distribution(z, p)
        cdf = probs.cumsum(-1, dtype=torch.float64)
        idx = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True)
        idx = idx.clamp(max=probs.shape[-1] - 1)
        tokens = (idx if ids is None else ids.gather(-1, idx)).squeeze(-1)
    chosen = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not certainty:
        return tokens, chosen
    return tokens, chosen, lse - logits.mean(dim=-1) - math.log(logits.shape[-1])


TOP_P_CANDIDATES = 256  # top-p without top-k: the first candidates sorted (doubled until they hold top_p)


def _kept_distribution(z: torch.Tensor, p: SamplingParams):
    """(ids [M, K] int64 in vocabulary order or None for all V, unnormalized probabilities [M, K or V] of the kept
    tokens, 0 for the cut ones): top-k then top-p of `choose_tokens`' rule, sorting at most the candidates."""
    v = z.shape[-1]
    if not p.top_k and p.top_p >= 1.0:
        return None, torch.softmax(z, dim=-1)
    k = min(p.top_k or TOP_P_CANDIDATES, v)
    while True:
        ids = _first_in_order(z, k)
        cz = z.gather(-1, ids)  # the candidates' logits, in vocabulary order
        if p.top_p >= 1.0:
            return ids, torch.softmax(cz, dim=-1)
        sz, order = torch.sort(cz, dim=-1, descending=True, stable=True)  # K candidates, not V
        # top-k renormalizes over its k tokens before top-p; top-p alone uses the whole vocabulary's softmax
        probs = torch.softmax(sz, dim=-1) if p.top_k else torch.exp(sz - torch.logsumexp(z, dim=-1, keepdim=True))
        probs = probs.double()
        mass = probs.cumsum(-1)
        if p.top_k or k == v or bool((mass[:, -1] >= p.top_p).all()):  # the nucleus lies within the candidates
            keep = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, (mass - probs) < p.top_p)
            return ids, torch.softmax(cz, dim=-1).masked_fill(~keep, 0.0)
        k = min(2 * k, v)


def _first_in_order(z: torch.Tensor, k: int) -> torch.Tensor:
    """The ids [M, k] (in vocabulary order) of the first k tokens of each row's stable descending order of z:
    every token above the k-th largest value, then the lowest ids among those equal to it."""
    m, v = z.shape
    if k >= v:
        return torch.arange(v, device=z.device).expand(m, v)
    kth = torch.topk(z, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above, tied = z > kth, z == kth
    keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # exactly k per row
    slot = torch.where(keep, keep.cumsum(-1) - 1, k)  # a kept token's place among its row's k; k: dropped
    ids = torch.empty(m, k + 1, dtype=torch.int64, device=z.device)  # scatter, not nonzero: no host sync
    ids.scatter_(-1, slot, torch.arange(v, device=z.device).expand(m, v))
    return ids[:, :k]


def choose_tokens_reference(logits: torch.Tensor, u: torch.Tensor, p: SamplingParams):
    """`choose_tokens`' rule written plainly, one full stable sort per row: (tokens [M], log-probs [M])."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    if p.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        z, order = torch.sort(logits / p.temperature, dim=-1, descending=True, stable=True)
        if p.top_k:
            z[:, p.top_k :] = float("-inf")
        probs = torch.softmax(z, dim=-1).double()
        if p.top_p < 1.0:
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            probs = probs.masked_fill(before >= p.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, probs)  # back to vocabulary order
        cdf = probs.cumsum(-1)
        idx = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True)
        tokens = idx.clamp(max=logits.shape[-1] - 1).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------- generation


@dataclass
class Completion:
    tokens: list = field(default_factory=list)
    logprob_sum: float = 0.0
    finish_reason: str = "length"
    certainty_sum: float = 0.0  # sum over the tokens of KL(U || p_t): see `self_certainty`

    @property
    def self_certainty(self) -> float:
        """Self-certainty (Kang et al. 2025, arXiv 2502.18581): the mean over the sample's tokens t (EOS
        included, as logprob_count) of KL(U || p_t) = -log V - (1/V) sum_v log p_t(v), p_t the model's
        distribution at temperature 1 over the V tokens when token t was chosen. 0 for a uniform p_t, larger
        the more peaked; summed during decoding from the log-softmax the sampler computes anyway (one [slots]
        reduction per step, no [N x V] kept)."""
        return self.certainty_sum / len(self.tokens) if self.tokens else 0.0


@dataclass
class _Active:
    """A prompt in the prefix pool: its samples are decoding, waiting for a slot, or finished."""

    key: object
    length: int  # prompt tokens (its prefix in the pool)
    seeds: list
    completions: list
    slot: list  # per sample: its decode slot while it decodes, else None
    first_logits: object = None  # [V]: the prefill's last logits, kept until every sample has a slot
    admitted: int = 0  # samples given a slot so far (in sample order)
    live: int = 0  # samples decoding now
    allowed: int = 0  # samples it may admit before `more` is asked (all of them unless adaptive)


@torch.no_grad()
def stream(model, requests, params: SamplingParams, slots: int, block: int = 0, more=None):
    """Continuous batching over a fixed budget of `slots` decode slots; yields (key, completions) per prompt.

    requests: iterable of (key, token ids, seeds); prompt b brings N_b = len(seeds) samples. Samples are
    admitted in order (prompt by prompt, sample by sample) as slots free up: a prompt is prefilled once
    into the prefix pool when its first sample gets a slot (and params.prefix_pool_tokens allows: 0 = no
    limit), each sample's first token comes from the prefill's last logits, and then it decodes with all
    others, one token per slot per step; a finished sample frees its slot at once, and a prompt leaves (its
    completions are yielded, its prefix dropped) when its last sample finishes.

    Adaptive sample count (`block` > 0): a prompt's samples are admitted `block` at a time in sample order
    (0..k-1, then k..2k-1, ...), all from its prefix, which stays in the pool until the prompt is done (never
    prefilled again). When its admitted samples have all finished, `more(key, completions so far)` decides:
    True admits the next block (at most N_b in all), False ends the prompt with the completions so far (`more`
    None: always True). While a prompt's block decodes, free slots go to the next prompts' samples. Earlier
    prompts are served first. With sampling counter-based, a prompt's first m completions are the same as in a
    run without blocks (where the products are batch invariant, see below).

    Batch invariance: the decode batch is always the S slots (idle ones padded) and each prompt's prefix
    attention always gets its N_b sample rows in sample order (zeros for samples not decoding), so matrix
    products have fixed sizes and a sample's tokens and log-probabilities do not depend on what else is
    decoding where those products are batch invariant at a fixed size (the CPU in float32).

    Slot utilization = busy slot-steps / (S x steps) = params.stats["busy_slot_steps"] / ["slot_steps"], a
    step being one token chosen per slot.
    """
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    prefix = PrefixPool(model, device, dtype, capacity=params.prefix_pool_tokens)  # grows only past the cap
    suffix = SuffixCache.allocate(model, slots, params.max_new_tokens, device, dtype)
    prefix_attn = prefix_attention_fn(device, params.backend)
    graphs = None
    if params.cuda_graphs and torch.device(device).type == "cuda":
        from .graphs import DecodeGraphs

        graphs = DecodeGraphs(model, suffix, prefix_attn, params.stats)
    eos = set(int(e) for e in params.eos_token_ids)
    owner = [None] * slots  # (the _Active prompt, its sample index) of each slot; None = free
    step = [0] * slots  # tokens the slot's sample has chosen so far
    seeds = torch.zeros(slots, dtype=torch.int64)
    logits = torch.zeros(slots, model.config.vocab_size, dtype=dtype, device=device)
    active, requests, exhausted = [], iter(requests), False
    stats = params.stats
    for key in ("busy_slot_steps", "slot_steps"):
        stats.setdefault(key, 0)
    if block < 0:
        raise ValueError(f"block must be >= 0 (0 = all samples of a prompt at once), got {block}")
    while True:
        free = [s for s in range(slots) if owner[s] is None]
        while free:  # admit samples in order while slots are free (the earliest prompt with some allowed first)
            a = next((x for x in active if x.admitted < x.allowed), None)
            if a is None:
                if exhausted:
                    break
                request = next(requests, None)
                if request is None:
                    exhausted = True
                    break
                a = _admit_prompt(model, prefix, request, params, block)
                if a is None:  # the prefix pool is full: wait for a prompt to leave
                    requests = itertools.chain([request], requests)
                    break
                active.append(a)
            while free and a.admitted < a.allowed:
                s, i = free.pop(0), a.admitted
                owner[s], step[s], seeds[s], a.slot[i] = (a, i), 0, a.seeds[i], s
                logits[s] = a.first_logits
                a.admitted += 1
                a.live += 1
            if a.admitted == len(a.seeds):
                a.first_logits = None
        if not active:
            return
        busy = [s for s in range(slots) if owner[s] is not None]
        offsets = torch.tensor([_signed((0x9E3779B97F4A7C15 * (t + 1)) & MASK64) for t in step], dtype=torch.int64)
        tokens, logp, kl = choose_tokens(logits, _uniform_from(seeds + offsets), params, certainty=True)
        tokens_host, (logp_host, kl_host) = tokens.tolist(), torch.stack((logp, kl)).tolist()  # one copy of both
        stats["busy_slot_steps"] += len(busy)
        stats["slot_steps"] += slots
        stats["decode_tokens"] += len(busy)
        for s in busy:
            (a, i), tok = owner[s], tokens_host[s]
            c = a.completions[i]
            c.tokens.append(tok)
            c.logprob_sum += logp_host[s]
            c.certainty_sum += kl_host[s]
            step[s] += 1
            if tok in eos:
                c.finish_reason = "stop"
            if tok in eos or step[s] == params.max_new_tokens:
                owner[s], a.slot[i] = None, None
                a.live -= 1
        for j in reversed(range(len(active))):
            a = active[j]
            if a.live or a.admitted < a.allowed:
                continue
            if a.admitted < len(a.seeds) and (more is None or more(a.key, a.completions[:a.admitted])):
                a.allowed = min(a.allowed + block, len(a.seeds))  # the next block: admitted at the next step
                continue
            prefix.remove(j)
            active.pop(j)
            yield a.key, a.completions[:a.admitted]
        if all(o is None for o in owner):
            continue
        batch = _decode_batch(active, owner, step, tokens_host, slots, device)
        if graphs is not None:
            logits = graphs(batch, prefix)
        elif prefix_attn is prefix_decode_sdpa:  # the CPU: the step's bookkeeping once, not once per layer
            logits = model.lm_head(decode_step_sdpa(model, batch, prefix, suffix))
        else:
            logits = model.lm_head(decode_step(model, batch, prefix, suffix, prefix_attn))
        stats["decode_steps"] += 1


def _admit_prompt(model, prefix: PrefixPool, request, params: SamplingParams, block: int = 0):
    """Prefill a request's prompt into the pool -> its _Active, or None when the pool has no room for it yet."""
    key, ids, sample_seeds = request
    if len(ids) == 0 or len(sample_seeds) == 0:
        raise ValueError(f"prompt {key!r}: need a non-empty prompt and at least one sample, got {len(ids)} tokens "
                         f"and {len(sample_seeds)} samples")
    if prefix.lengths and params.prefix_pool_tokens and sum(prefix.lengths) + len(ids) > params.prefix_pool_tokens:
        return None
    last = prefill(model, [ids], prefix.add(len(ids)), params.prefill_chunk, params.backend)  # [1, H]
    params.stats["prefill_tokens"] += len(ids)
    n = len(sample_seeds)
    return _Active(key, len(ids), list(sample_seeds), [Completion() for _ in range(n)], [None] * n,
                   model.lm_head(last)[0], allowed=min(block, n) if block else n)


def _decode_batch(active, owner, step, tokens_host, slots, device) -> DecodeBatch:
    """The decode step's inputs: every slot's token (0 for idle ones); each prompt's N_b rows in sample order."""
    fed = torch.tensor([tokens_host[s] if owner[s] is not None else 0 for s in range(slots)])
    write = torch.tensor([step[s] - 1 if owner[s] is not None else 0 for s in range(slots)])
    positions = torch.tensor([owner[s][0].length if owner[s] is not None else 0 for s in range(slots)]) + write
    rows = [slots if s is None else s for a in active for s in a.slot]  # `slots`: a zero query row
    cu_q = torch.tensor([0] + [len(a.slot) for a in active]).cumsum(0)
    return DecodeBatch(fed.to(device), positions.to(device), write.to(device), torch.tensor(rows, device=device),
                       cu_q.to(device=device, dtype=torch.int32), max(len(a.slot) for a in active),
                       max(step[s] for s in range(slots) if owner[s] is not None))  # span: on the host, no sync


def generate(model, prompts: list, seeds: list, params: SamplingParams, block: int = 0, more=None) -> list:
    """prompts: token id lists; seeds: per prompt, its samples' seeds (N_b = len(seeds[b]) samples, see sample_seed).

    Returns per prompt a list of Completion (one per sample; with `block` and `more`, the samples spent: see
    `stream`, which gets `more(b, completions)` with b the prompt's index). Every prompt is prefilled exactly
    once. Decodes with params.decode_slots slots (0: all samples of the call at once, i.e. one static batch).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed list per prompt, got {len(prompts)} prompts and {len(seeds)} seed lists")
    slots = params.decode_slots or sum(len(s) for s in seeds)
    out = [None] * len(prompts)
    for b, completions in stream(model, zip(range(len(prompts)), prompts, seeds), params, max(slots, 1), block, more):
        out[b] = completions
    return out


# ---------------------------------------------------------------------------------------------- the stage


def _too_long(prompt_id, tokens: int, limit: int, others=()) -> str:
    more = ""
    if others:
        more = f" (and {len(others)} more: {', '.join(map(repr, others[:5]))}{' ...' if len(others) > 5 else ''})"
    return (f"prompt {prompt_id!r} has {tokens} tokens, over the limit of {limit}{more} (model context minus "
            "--max-new-tokens, or --max-prompt-tokens); pass --truncate middle to cut it from the middle")


def fit_prompt(ids: list, limit: int, truncate: bool, prompt_id) -> tuple:
    """(ids, truncated): ids within `limit` tokens, cut from the middle as LongBench does when `truncate`."""
    if len(ids) <= limit:
        return ids, False
    if not truncate:
        raise ValueError(_too_long(prompt_id, len(ids), limit))
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :], True


def read_prompts(path: str, limit=None) -> list:
    from sealong.jsonl import IdChecker, JsonlError, numbered_records

    records, check_id = [], IdChecker(path)
    if limit is not None and limit < 1:  # --limit is >= 1 (SampleConfig); 0 here means none, not one
        return []
    for n, record in numbered_records(path, required=("id", "context", "question")):
        check_id(n, record["id"])
        for key in ("context", "question") + (("prompt",) if "prompt" in record else ()):
            if not isinstance(record[key], str):
                raise JsonlError(f"{path}:{n}: (id {record['id']!r}) {key!r} must be a string, got {type(record[key]).__name__}")
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records


def output_texts(completions: list, tokenizer) -> list:
    """The completions' texts, without the EOS token that ended them (the record's `outputs`)."""
    return [tokenizer.decode(c.tokens[:-1] if c.finish_reason == "stop" else c.tokens, skip_special_tokens=True)
            for c in completions]


def samples_record(prompt: dict, completions: list, tokenizer, prompt_tokens: int, truncated: bool) -> dict:
    """The samples JSONL record of one prompt; output texts leave out the EOS token that ended them."""
    record = {k: v for k, v in prompt.items() if k not in ("context", "prompt")}  # the long texts stay out
    record.update(
        outputs=output_texts(completions, tokenizer),
        num_tokens=[len(c.tokens) for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
        logprob_sum=[c.logprob_sum for c in completions],
        logprob_count=[len(c.tokens) for c in completions],
        self_certainty=[c.self_certainty for c in completions],
        prompt_tokens=prompt_tokens,
        truncated=truncated,
    )
    return record


def sampler_settings(args) -> dict:
    """The options that change the samples: kept in `<output>.meta.json` and in every record (`sampler`)."""
    from sealong.provenance import model_fingerprint

    model = model_fingerprint(args.model)
    return {"model": model["path"], "model_config_sha256": model["config_sha256"], "num_samples": args.num_samples,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "strategy": args.strategy,
            "max_prompt_tokens": args.max_prompt_tokens, "truncate": args.truncate, "dtype": args.dtype,
            **adaptive_settings(args)}


def adaptive_settings(args) -> dict:
    """The adaptive sample count's settings, only when it is on (so runs without it keep their settings)."""
    if not getattr(args, "adaptive_block", 0):
        return {}
    from sealong.score.consensus import MIN_CLUSTER

    return {"adaptive_block": args.adaptive_block, "adaptive_share": args.adaptive_share,
            "adaptive_min_samples": args.adaptive_min_samples, "adaptive_min_cluster": MIN_CLUSTER}


def adaptive_rule(tokenizer, share: float, min_samples: int):
    """(more, stop): `more(key, completions)` for `stream` (True: sample the next block) and `stop(completions)`,
    the record's `adaptive_stop`: "consensus" once at least `min_samples` samples have finished and their top answer
    cluster holds at least 2 of them and at least `share` of those with an answer (sealong.score.consensus.reached),
    else "budget" (N spent)."""
    from sealong.score.consensus import answer_consensus, reached

    def agreed(completions) -> bool:
        return reached(answer_consensus(output_texts(completions, tokenizer)), share, min_samples)

    return (lambda key, completions: not agreed(completions)), (lambda c: "consensus" if agreed(c) else "budget")


def check_prompt_lengths(prompts: list, tokenizer, strategy: str, limit: int, truncate: bool) -> None:
    """Every prompt within `limit` tokens (or cut, with `truncate`), checked before any sampling: the error names
    the first prompt over the limit and counts the others."""
    from sealong.data.prompts import record_token_ids

    if truncate:
        return
    lengths = ((p["id"], len(record_token_ids(tokenizer, p, strategy))) for p in prompts)
    over = [(i, n) for i, n in lengths if n > limit]
    if over:
        raise ValueError(_too_long(*over[0], limit, [i for i, _ in over[1:]]))


def check_paths(args) -> None:
    """--output is not the --prompts file (its records would read as samples already done)."""
    output, prompts = args.output, args.prompts
    if os.path.abspath(output) == os.path.abspath(prompts) or (
            os.path.exists(output) and os.path.exists(prompts) and os.path.samefile(output, prompts)):
        raise ValueError(f"--output {args.output} is the --prompts file: samples go to another file")


def run(args) -> int:
    from . import shards

    check_paths(args)
    if args.nproc_per_node > 1 and not shards.under_torchrun():
        read_prompts(args.prompts, args.limit)  # a bad line: one `error:` line and exit 2 here, not torchrun's 1
        return shards.launch("sealong.sampler", args.nproc_per_node, shards.flags_of(args))
    ranks = shards.Ranks(args.device)
    try:
        if ranks.rank != 0:
            return _sample(args, ranks)
        from sealong.lock import claim_output

        with claim_output(args.output, what="--output"):  # writable, one writer (rank 0 writes OUTPUT)
            return _sample(args, ranks)  # if rank 0 stops here, torchrun stops the other ranks
    finally:
        ranks.close()


def _sample(args, ranks) -> int:
    from sealong import provenance
    from sealong.data.prompts import record_token_ids
    from sealong.jsonl import completed_ids
    from sealong.model import ModelConfig, load_tokenizer

    from . import shards

    slots = args.decode_slots or args.batch_prompts * args.num_samples  # ranges: SampleConfig
    prompts = read_prompts(args.prompts, args.limit)
    if not prompts:
        raise ValueError(f"--prompts {args.prompts}: no prompt records (an empty file): nothing to sample")
    order = [p["id"] for p in prompts]
    settings = sampler_settings(args)  # a resume under other settings is refused, naming the difference
    if ranks.rank == 0:  # fold in the shards of a killed data-parallel run; cut a torn last line
        shards.merge(args.output, order)
        provenance.start(args.output, "sample", settings, bool(completed_ids(args.output)), model=args.model,
                         what="--output", record_key="sampler")
    ranks.barrier()
    done = completed_ids(args.output)
    todo = [p for p in prompts if p["id"] not in done]
    if ranks.rank == 0:
        log.info(f"{len(prompts)} prompts in {args.prompts}, {len(prompts) - len(todo)} already in {args.output}")
    positions = ModelConfig.from_folder(args.model).max_position_embeddings
    limit = args.max_prompt_tokens if args.max_prompt_tokens is not None else positions - args.max_new_tokens
    if limit < 1:
        raise ValueError(f"no room for a prompt: --max-new-tokens {args.max_new_tokens} leaves {limit} of the model's "
                         f"{positions} positions (--max-prompt-tokens must be >= 1)")
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code) if todo else None
    if todo:
        check_prompt_lengths(todo, tokenizer, args.strategy, limit, args.truncate == "middle")  # all, up front
    fit = lambda p: fit_prompt(record_token_ids(tokenizer, p, args.strategy), limit,  # noqa: E731
                               args.truncate == "middle", p["id"])
    if ranks.world > 1:  # every rank tokenizes every prompt to do and takes its part of the same split
        todo = [todo[i] for i in shards.plan([len(fit(p)[0]) for p in todo], ranks.world)[ranks.rank]]
    target = shards.shard_path(args.output, ranks.rank)  # records in the order prompts finish; merged below
    stats = {}
    if todo:
        device = args.device if args.device and ranks.world == 1 else ranks.device
        stats = sample_prompts(args, todo, fit, tokenizer, slots, target, device, settings, disable_bar=ranks.rank != 0)
    ranks.barrier()
    keys = ("prefill_tokens", "decode_tokens", "decode_steps", "busy_slot_steps", "slot_steps")
    total = dict(zip(keys, ranks.sum([stats.get(k, 0) for k in keys])))
    if ranks.rank == 0:
        written = shards.merge(args.output, order)
        missing = set(order) - completed_ids(args.output)
        if missing:
            raise RuntimeError(f"sampler: {len(missing)} of {len(order)} ids missing from {args.output} after "
                               f"the merge ({written} records): are the ranks' shard files on one shared filesystem?")
        if total["slot_steps"]:
            log.info(f"slot utilization {total['busy_slot_steps'] / total['slot_steps']:.1%} (busy slot-steps "
                     f"{total['busy_slot_steps']} / {total['slot_steps']}, {slots} slots x {ranks.world} rank(s)); "
                     f"{total['prefill_tokens']} prefill and {total['decode_tokens']} decode tokens")
    return 0


def sample_prompts(args, todo, fit, tokenizer, slots, target, device, settings=None, disable_bar=False) -> dict:
    """Sample `todo` through the continuous-batching stream; append each record to `target` as its prompt ends."""
    from sealong.jsonl import append_jsonl
    from sealong.model import eos_token_ids, load_model
    from sealong.progress import Progress

    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, eos_token_ids=tuple(eos_token_ids(args.model, tokenizer)), prefill_chunk=args.prefill_chunk,
        backend=args.backend, decode_slots=slots, prefix_pool_tokens=args.prefix_pool_tokens, cuda_graphs=args.cuda_graphs,
    )
    fitted, block, more, stop = {}, getattr(args, "adaptive_block", 0), None, None
    if block:
        more, stop = adaptive_rule(tokenizer, args.adaptive_share, args.adaptive_min_samples)

    def requests():
        for b, p in enumerate(todo):
            fitted[b] = fit(p)
            yield b, fitted[b][0], [sample_seed(args.seed, p["id"], i) for i in range(args.num_samples)]

    start = time.perf_counter()
    # a bar on a terminal, else a line every few seconds with the count, rate and time left (sealong.progress)
    with Progress(len(todo), "prompts", "sample", log, enabled=not disable_bar) as progress:
        for b, completions in stream(model, requests(), params, slots, block, more):
            ids, cut = fitted.pop(b)
            record = samples_record(todo[b], completions, tokenizer, len(ids), cut)
            if stop is not None:
                record["adaptive_stop"] = stop(completions)
            append_jsonl(target, [dict(record, sampler=settings)])
            elapsed = time.perf_counter() - start
            utilization = params.stats['busy_slot_steps'] / max(params.stats['slot_steps'], 1)
            progress.update(1, **{"tokens/s": f"{params.stats['decode_tokens'] / elapsed:.1f}"}, slots=f"{utilization:.0%}")
    return params.stats


def kept_on_interrupt(args) -> str:
    """What a Ctrl-C leaves (sealong.interrupt): the prompts whose records are in the output and its shards."""
    import os

    from . import shards

    parts = shards.shard_files(args.output)
    paths = ([args.output] if os.path.exists(args.output) else []) + parts
    done = {key for path in paths for _, key, _ in shards.complete_lines(path)}
    where = args.output + (" and its shard files" if parts else "")
    return (f"{len(done)} of {len(read_prompts(args.prompts, args.limit))} prompts' samples kept ({where}); the same "
            "command resumes")


def main(argv=None):
    """`python -m sealong.sample`: options are SampleConfig's (sealong/config/stages.py)."""
    from sealong.config.parser import stage_main

    return stage_main("sample", argv, prog="python -m sealong.sample")


if __name__ == "__main__":
    sys.exit(main())
