"""N samples per long prompt over one shared prefix: the sampling stage of SEALONG.

Each prompt is prefilled once (in chunks) and its KV cache kept once; all N samples of all prompts of a
batch decode together, attending to their prompt's prefix as one matrix product and to their own suffix,
merged exactly by log-sum-exp (see sealong/kv_cache.py). HF `generate(num_return_sequences=N)` instead
prefills and caches the prompt N times.

Randomness is counter-based: sample i of prompt `id` draws its uniform number at step t from
hash(seed, id, i) and t alone, so the same seed gives the same output whatever else is in the batch
(exactly so where the logits are batch-invariant, as on the CPU in float32).

    python -m sealong.sampler --model CKPT --prompts run/prompts.jsonl --output run/samples.jsonl \\
        --num-samples 32 --temperature 0.7 --max-new-tokens 1024

Reads prompts JSONL (`id`, `context`, `question`, other fields kept) and appends one samples record per
prompt: `id`, `question`, `outputs`, `num_tokens`, `finish_reasons` ("stop" | "length"), `logprob_sum`,
`logprob_count` (log-probabilities of the sampled tokens under the model's own distribution, temperature 1,
EOS included), `prompt_tokens`, `truncated`, `sampler` (the settings that made it: model and its config hash,
N, temperature, top-p/k, seed, ...), plus the prompt record's other fields except `context`. The settings are
also in `<output>.meta.json` (sealong.provenance). Resumable by id; a torn last line from a crash is cut off
first; a resume under other settings is refused, naming them. Every prompt's length is checked before sampling.
"""

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass, field

import torch

from sealong.data.prompts import DEFAULT_STRATEGY, STRATEGIES
from .kv_cache import PrefixCache, SuffixCache, decode_step, prefill, prefix_attention_fn

MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    max_new_tokens: int = 1024  # generation stops with finish reason "length" after this many tokens
    temperature: float = 0.7  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of top tokens with probability >= top_p
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    eos_token_ids: tuple = ()  # any of these ends a sample with finish reason "stop" (the token is counted)
    prefill_chunk: int = 4096  # prompt tokens per prefill forward
    backend: str = "auto"  # "auto" (Triton kernels on CUDA, reference on CPU), "triton", "reference"
    stats: dict = field(default_factory=lambda: {"prefill_tokens": 0, "decode_tokens": 0, "decode_steps": 0})

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.prefill_chunk < 1:
            raise ValueError("max_new_tokens and prefill_chunk must be >= 1")
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
    z = seeds + _signed((0x9E3779B97F4A7C15 * (step + 1)) & MASK64)
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def choose_tokens(logits: torch.Tensor, u: torch.Tensor, p: SamplingParams):
    """logits [M, V], u [M] -> (tokens [M] int64, log-prob of each token under softmax(logits) [M] float32).

    Temperature, then top-k, then top-p on the sorted distribution; the token is the inverse CDF at u.
    """
    logits = logits.float()
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
        cdf = probs.cumsum(-1)
        idx = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None], right=True)
        tokens = order.gather(-1, idx.clamp(max=logits.shape[-1] - 1)).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------- generation


@dataclass
class Completion:
    tokens: list = field(default_factory=list)
    logprob_sum: float = 0.0
    finish_reason: str = "length"


@torch.no_grad()
def generate(model, prompts: list, seeds: list, params: SamplingParams) -> list:
    """prompts: token id lists; seeds: per prompt, its samples' seeds (N_b = len(seeds[b]) samples, see sample_seed).

    Returns per prompt a list of Completion (one per sample). Every prompt is prefilled exactly once.
    """
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    counts = [len(s) for s in seeds]
    if len(prompts) != len(seeds) or any(len(ids) == 0 for ids in prompts) or 0 in counts:
        raise ValueError("need one non-empty token list and at least one seed per prompt")
    prefix = PrefixCache.allocate(model, [len(ids) for ids in prompts], device, dtype)
    last_hidden = prefill(model, prompts, prefix, params.prefill_chunk, params.backend)  # [B, H]
    params.stats["prefill_tokens"] += sum(prefix.lengths)
    prefix_attn = prefix_attention_fn(device, params.backend)

    owner = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(counts))  # host [M]: prompt of each row
    rows = torch.arange(len(owner))  # host [M]: which completion each active row is
    seed_t = torch.tensor([s for ss in seeds for s in ss], dtype=torch.int64, device=device)
    completions = [Completion() for _ in range(len(owner))]
    eos = set(int(e) for e in params.eos_token_ids)
    suffix = SuffixCache.allocate(model, len(owner), params.max_new_tokens, device, dtype)
    logits = model.lm_head(last_hidden)[owner.to(device)]
    for step in range(params.max_new_tokens):
        tokens, logp = choose_tokens(logits, uniform(seed_t, step), params)
        keep = []
        for r, tok, lp in zip(rows.tolist(), tokens.tolist(), logp.tolist()):
            c = completions[r]
            c.tokens.append(tok)
            c.logprob_sum += lp
            if tok in eos:
                c.finish_reason = "stop"
            keep.append(tok not in eos)
        params.stats["decode_tokens"] += len(keep)
        if step + 1 == params.max_new_tokens or not any(keep):
            break
        if not all(keep):  # drop finished samples from the batch
            keep_t = torch.tensor(keep)
            rows, owner = rows[keep_t], owner[keep_t]
            idx = keep_t.nonzero().squeeze(-1).to(device)
            seed_t, tokens, suffix = seed_t[idx], tokens[idx], suffix.select(idx)
        per_prompt = torch.bincount(owner, minlength=len(prompts))
        cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), per_prompt.cumsum(0)]).to(device=device, dtype=torch.int32)
        positions = torch.tensor(prefix.lengths)[owner].to(device) + step
        hidden = decode_step(model, tokens, positions, step, prefix, suffix, cu_q, int(per_prompt.max()), prefix_attn)
        logits = model.lm_head(hidden)
        params.stats["decode_steps"] += 1
    out, start = [], 0
    for n in counts:
        out.append(completions[start : start + n])
        start += n
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


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--prompts", required=True, help="prompts JSONL: id, context, question, other fields kept")
    parser.add_argument("--output", required=True, help="samples JSONL, appended to and resumed by id")
    parser.add_argument("--num-samples", type=int, default=32, help="N outputs per prompt (paper: 32)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="per-sample seeds derive from (seed, id, index)")
    parser.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=list(STRATEGIES), help="the paper's prompt strategy")
    parser.add_argument("--batch-prompts", type=int, default=1, help="prompts decoded together (N samples each)")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per prefill forward")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt limit (default: the model's max_position_embeddings minus --max-new-tokens)")
    parser.add_argument("--truncate", choices=["error", "middle"], default="error",
                        help="a prompt over the limit: stop with an error naming its id, or cut its middle")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--backend", choices=["auto", "triton", "reference"], default="auto")
    parser.add_argument("--limit", type=int, default=None, help="sample at most this many prompts of the file")
    parser.add_argument("--trust-remote-code", action="store_true", help="let the tokenizer run code from the folder")
    return parser


def read_prompts(path: str, limit=None) -> list:
    from sealong.jsonl import IdChecker, JsonlError, numbered_records

    records, check_id = [], IdChecker(path)
    for n, record in numbered_records(path, required=("id", "context", "question")):
        check_id(n, record["id"])
        for key in ("context", "question"):
            if not isinstance(record[key], str):
                raise JsonlError(f"{path}:{n}: (id {record['id']!r}) {key!r} must be a string, got {type(record[key]).__name__}")
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records


def samples_record(prompt: dict, completions: list, tokenizer, prompt_tokens: int, truncated: bool) -> dict:
    """The samples JSONL record of one prompt; output texts leave out the EOS token that ended them."""
    record = {k: v for k, v in prompt.items() if k != "context"}
    record.update(
        outputs=[tokenizer.decode(c.tokens[:-1] if c.finish_reason == "stop" else c.tokens, skip_special_tokens=True)
                 for c in completions],
        num_tokens=[len(c.tokens) for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
        logprob_sum=[c.logprob_sum for c in completions],
        logprob_count=[len(c.tokens) for c in completions],
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
            "max_prompt_tokens": args.max_prompt_tokens, "truncate": args.truncate, "dtype": args.dtype}


def check_prompt_lengths(prompts: list, tokenizer, strategy: str, limit: int, truncate: bool) -> None:
    """Every prompt within `limit` tokens (or cut, with `truncate`), checked before any sampling: the error names
    the first prompt over the limit and counts the others."""
    from sealong.data.prompts import prompt_token_ids

    if truncate:
        return
    lengths = ((p["id"], len(prompt_token_ids(tokenizer, p["context"], p["question"], strategy))) for p in prompts)
    over = [(i, n) for i, n in lengths if n > limit]
    if over:
        raise ValueError(_too_long(*over[0], limit, [i for i, _ in over[1:]]))


def run(args) -> int:
    """The stage: claims --output (writable, one writer: sealong.lock) before any work, then samples."""
    from sealong.lock import claim_output

    if args.num_samples < 1 or args.batch_prompts < 1:
        raise ValueError(f"--num-samples and --batch-prompts must be >= 1, got {args.num_samples} and {args.batch_prompts}")
    with claim_output(args.output, what="--output"):
        return _sample(args)


def _sample(args) -> int:
    from tqdm import tqdm

    from sealong.data.prompts import prompt_token_ids
    from sealong.jsonl import append_jsonl, completed_ids
    from sealong import provenance
    from sealong.model import ModelConfig, eos_token_ids, load_model, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = read_prompts(args.prompts, args.limit)
    done = completed_ids(args.output)
    settings = sampler_settings(args)  # a resume under other settings is refused, naming the difference
    provenance.start(args.output, "sample", settings, bool(done), model=args.model, what="--output",
                     record_key="sampler")
    todo = [p for p in prompts if p["id"] not in done]
    print(f"sampler: {len(prompts)} prompts in {args.prompts}, {len(prompts) - len(todo)} already in {args.output}", file=sys.stderr)
    if not todo:
        return 0
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    positions = ModelConfig.from_folder(args.model).max_position_embeddings
    limit = args.max_prompt_tokens or positions - args.max_new_tokens
    if limit < 1:
        raise ValueError(f"no room for a prompt: --max-new-tokens {args.max_new_tokens} leaves {limit} of the model's "
                         f"{positions} positions (--max-prompt-tokens must be >= 1)")
    check_prompt_lengths(todo, tokenizer, args.strategy, limit, args.truncate == "middle")  # all of them, up front
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, eos_token_ids=tuple(eos_token_ids(args.model, tokenizer)), prefill_chunk=args.prefill_chunk,
        backend=args.backend,
    )
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="prompt", file=sys.stderr)
    for b in range(0, len(todo), args.batch_prompts):
        batch = todo[b : b + args.batch_prompts]
        fitted = [fit_prompt(prompt_token_ids(tokenizer, p["context"], p["question"], args.strategy), limit,
                             args.truncate == "middle", p["id"]) for p in batch]
        seeds = [[sample_seed(args.seed, p["id"], i) for i in range(args.num_samples)] for p in batch]
        results = generate(model, [ids for ids, _ in fitted], seeds, params)
        append_jsonl(args.output, [dict(samples_record(p, c, tokenizer, len(ids), cut), sampler=settings)
                                   for p, c, (ids, cut) in zip(batch, results, fitted)])
        bar.update(len(batch))
        elapsed = time.perf_counter() - start
        bar.set_postfix(prompts_s=f"{bar.n / elapsed:.3f}", tokens_s=f"{params.stats['decode_tokens'] / elapsed:.1f}")
    bar.close()
    return 0


parser = add_arguments(argparse.ArgumentParser(prog="python -m sealong.sampler", description=__doc__.split("\n\n")[0]))

def main(argv=None):
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
