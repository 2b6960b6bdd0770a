"""Every stage's settings: one dataclass per stage, each field its default, help text, aliases and range.

The defaults are the paper's settings (SEALONG, arXiv 2411.08147, and the authors' code, SihengLi99/SEALONG);
the `demo` preset (sealong/config/presets/demo.yaml) overrides some of them for the offline CPU demo. Adding an
option is adding one field here (TrainConfig: sealong/train/config.py). Importing this module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from sealong.data.prompts import DEFAULT_STRATEGY, STRATEGIES
from sealong.train.config import TrainConfig

from .fields import Checked, option

Dtype = Literal["bfloat16", "float16", "float32"]
Strategy = Literal[tuple(STRATEGIES)]
UTILITIES = ("embedding", "rouge", "answer", "random")
SCORERS = ("mbr", "self-certainty", "mbr+certainty")
PAIRS_FORMATS = ("sealong", "trl")
Window = Literal["last", "mean", "first"]  # sealong.score.embed.WINDOWS
WINDOW_HELP = "outputs longer than the embedder reads: its last window (default), mean of windows, or first"


@dataclass
class SynthConfig(Checked):
    """`sealong synth`: long-context training prompts (no answers) and a held-out evaluation file."""

    stage: ClassVar[str] = "synth"
    out_dir: str = option("runs/default", "run directory (writes prompts.jsonl, eval.jsonl)")
    musique: Optional[str] = option(None, "MuSiQue JSONL (musique_ans_v1.0_train.jsonl); omitted: the built-in world")
    tokenizer: Optional[str] = option(None, "model folder whose tokenizer counts context tokens (default: offline BERT)")
    num_examples: int = option(2048, "training prompts to synthesize, at most the file's (about 1K already gives "
                               "most of the gain)", ge=1)
    num_eval: int = option(200, "held-out evaluation questions (built-in world, or the first of --eval-musique)", ge=0)
    eval_musique: Optional[str] = option(None, "MuSiQue dev JSONL turned into the held-out evaluation file")
    min_tokens: int = option(4096, "lower end of the uniform context length (model tokens)", ge=1)
    max_tokens: int = option(31744, "upper end of the uniform context length (31K)", ge=1)
    distractors: Literal["random", "nearest"] = option(
        "random", "paragraphs added around the supporting ones: random, or nearest by embedding (needs faiss)")
    own_distractors: Literal["first", "skip"] = option(
        "first", "first: the question's own non-supporting paragraphs before others (the authors' code); skip: "
        "other records' paragraphs only (easier contexts)")
    world: Literal["fresh", "fixed"] = option(
        "fresh", "built-in world without --musique: fresh facts per question (sealong.data.fresh_world: answers must "
        "be read from the context) or one fixed set of facts (a model can memorize them)")
    world_hops: str = option("2+3", "fresh world: hop counts of its questions, cycled, `+`-separated (e.g. 1+2)")
    world_passages: int = option(10, "fresh world: passages per question (chain, one near-name confuser per chain "
                                 "step, fillers); at least twice the most hops", ge=2)
    embed_model: Optional[str] = option(None, "sentence-transformers model for --distractors nearest")
    seed: int = option(0, "seeds question choice, context length, distractors, world")
    include_unanswerable: bool = option(False, "keep MuSiQue's unanswerable questions")
    overwrite: bool = option(False, "rebuild files that already exist")
    ruler: bool = option(False, "write RULER-style evaluation records (sealong.data.ruler) to <out-dir>/ruler.jsonl "
                         "instead of training prompts; lengths counted with --tokenizer")
    ruler_tasks: str = option("niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe",
                              "comma-separated RULER tasks")
    ruler_lengths: str = option("4096,8192,16384,32768", "comma-separated target lengths (prompt + the task's "
                                "tokens to generate, model tokens, within 2 percent)")
    ruler_per_task: int = option(25, "records per RULER task and length", ge=1)
    ruler_haystack: Optional[Literal["noise", "passages"]] = option(
        None, "haystack of the needle / variable-tracking tasks (default: each task's own, as RULER's)")

    def checks(self):
        return [(self.min_tokens <= self.max_tokens,
                 f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")]


@dataclass
class SampleConfig(Checked):
    """`sealong sample`: N outputs per prompt over one shared prefix."""

    stage: ClassVar[str] = "sample"
    model: Optional[str] = option(None, "checkpoint folder (config.json, safetensors, tokenizer)", required=True)
    prompts: Optional[str] = option(None, "prompts JSONL: id, context, question, other fields kept", required=True)
    output: Optional[str] = option(None, "samples JSONL, appended to and resumed by id", required=True)
    num_samples: int = option(32, "N outputs per prompt (paper: 32)", ge=1)
    temperature: float = option(0.7, "sampling temperature; 0 = greedy", ge=0)
    top_p: float = option(1.0, "nucleus sampling mass", gt=0, le=1)
    top_k: int = option(0, "0 = no top-k cut", ge=0)
    max_new_tokens: int = option(1024, "longest output", ge=1)
    seed: int = option(0, "per-sample seeds derive from (seed, id, index)")
    strategy: Strategy = option(DEFAULT_STRATEGY, "the paper's prompting strategy (Tables 9, 10)")
    batch_prompts: int = option(1, "prompts decoded together (N samples each): the default of --decode-slots is "
                                "this x N", ge=1)
    decode_slots: Optional[int] = option(
        None, "samples decoding at once (continuous batching: a finished sample's slot goes to the next waiting "
        "sample; default --batch-prompts x --num-samples)", ge=1)
    prefix_pool_tokens: int = option(0, "most prompt tokens whose KV cache is held at once (a prompt stays until its "
                                     "last sample ends; the next prompt waits for room); 0 = no limit", ge=0)
    nproc_per_node: int = option(1, "data-parallel sampling: start torchrun with this many processes (GPUs) on this "
                                 "node; under torchrun (any number of nodes) the job's own ranks are used", ge=1)
    cuda_graphs: bool = option(False, "replay the decode step from CUDA graphs (GPU)")
    prefill_chunk: int = option(4096, "prompt tokens per prefill forward", ge=1)
    max_prompt_tokens: Optional[int] = option(
        None, "prompt limit (default: the model's max_position_embeddings minus --max-new-tokens)", ge=1)
    truncate: Literal["error", "middle"] = option(
        "error", "a prompt over the limit: stop with an error naming its id, or cut its middle")
    dtype: Dtype = option("bfloat16", "compute dtype")
    device: Optional[str] = option(None, "cuda or cpu (default: cuda when available)")
    backend: Literal["auto", "triton", "reference"] = option("auto", "decode attention kernel")
    limit: Optional[int] = option(None, "sample only the first LIMIT prompts of the file (>= 1; omitted: all)", ge=1)
    trust_remote_code: bool = option(False, "let the tokenizer run code from the folder")
    adaptive_block: int = option(0, "adaptive sample count: sample each prompt's outputs this many at a time from its "
                                 "cached prefix and stop once they agree (--adaptive-share, --adaptive-min-samples), "
                                 "at most --num-samples; 0 = off: all N (the paper)", ge=0)
    adaptive_share: float = option(0.75, "adaptive stop: the top answer cluster, at least 2 agreeing outputs, holds at "
                                   "least this share of the outputs with an answer ...", gt=0, le=1)
    adaptive_min_samples: int = option(8, "... once at least this many samples have finished", ge=1)

    def checks(self):
        if not self.adaptive_block:
            return []
        return [(self.adaptive_block <= self.num_samples, f"adaptive_block ({self.adaptive_block}) must be <= "
                 f"num_samples ({self.num_samples}), or 0 (off)"),
                (self.adaptive_min_samples <= self.num_samples, f"adaptive_min_samples ({self.adaptive_min_samples}) "
                 f"must be <= num_samples ({self.num_samples}): no prompt could stop before N")]


@dataclass
class ScoreConfig(Checked):
    """`sealong score`: MBR scores of the samples and a preference pair per question."""

    stage: ClassVar[str] = "score"
    run_dir: Optional[str] = option(None, "run directory: defaults samples.jsonl, prompts.jsonl, scores.jsonl, pairs.jsonl")
    samples: Optional[str] = option(None, "samples JSONL (id, question, outputs, finish_reasons, ...)")
    out: Optional[str] = option(None, "scores JSONL to append to (default: <run-dir>/scores.jsonl)")
    pairs: Optional[str] = option(None, "training pairs JSONL (default: <run-dir>/pairs.jsonl)")
    prompts: Optional[str] = option(None, "prompts JSONL giving each id's context for the pairs")
    utility: Literal[UTILITIES] = option(
        "embedding", "embedding (cosine, the paper's MBR), rouge (ROUGE-L, needs sealong[rouge]), answer, random")
    model: Optional[str] = option(None, "sentence-transformers model name or folder (default: offline "
                                  "all-MiniLM-L6-v2, 256 word pieces); jina-embeddings-v3 = the paper's, from a local "
                                  "folder (sealong/score/embed.py)", aliases=["embedding_model"])
    window: Window = option("last", WINDOW_HELP)
    batch_size: int = option(64, "outputs per embedding batch", ge=1)
    chunk: int = option(64, "questions scored and appended together", ge=1)
    seed: int = option(0, "rejected picks and random scores are drawn from hash(seed, id)")
    dedup_threshold: float = option(0.98, "skip pairs whose chosen-rejected similarity is >= this (0 keeps all)",
                                    ge=0, le=1)
    reference_mode: bool = option(False, "the authors' code: self-similarity in the mean, truncated outputs may be "
                                  "chosen, no dedup")
    device: Optional[str] = option(None, "cuda or cpu (default: cuda when available)")
    trust_remote_code: bool = option(False, "let the embedding model run code from its folder (e.g. "
                                     "jina-embeddings-v3, the paper's)")
    nproc_per_node: int = option(1, "data-parallel scoring: start torchrun with this many processes (GPUs) on this "
                                 "node; under torchrun (any number of nodes) the job's own ranks are used", ge=1)
    pairs_format: Literal[PAIRS_FORMATS] = option(
        "sealong", "pairs file format: sealong's (scores record + context), or TRL's conversational "
        "prompt/chosen/rejected records")
    scorer: Literal[SCORERS] = option(
        "mbr", "mbr: mean utility to the other outputs (the paper); self-certainty: the sampler's per-output "
        "self-certainty (samples' `self_certainty`; no similarity needed); mbr+certainty: MBR with each peer "
        "weighted by its self-certainty")
    min_consensus: float = option(0.0, "skip questions whose top answer cluster holds less than this share of the "
                                  "outputs (0 keeps all)", ge=0, le=1)

    def checks(self):
        return [(not (self.utility == "random" and self.scorer != "mbr"),
                 f"--utility random (random scores, the baseline) cannot be combined with --scorer {self.scorer}")]


@dataclass
class EvalConfig(Checked):
    """`sealong eval`: SubEM / F1 tables of samples files (greedy, MBR@N, oracle@N, random@N)."""

    stage: ClassVar[str] = "eval"
    greedy: Optional[str] = option(None, "samples JSONL of greedy decoding (outputs[0] is scored)")
    sampled: Optional[str] = option(None, "samples JSONL with N outputs per question (MBR/oracle/random@n)")
    ns: Optional[str] = option(None, "comma-separated n values (default 1,2,4,... up to N)")
    embed_model: Optional[str] = option(None, "sentence-transformers model for MBR@n (default: offline MiniLM; "
                                        "jina-embeddings-v3: the paper's, from a local folder)",
                                        aliases=["embedding_model"])
    window: Window = option("last", WINDOW_HELP)
    no_mbr: bool = option(False, "skip MBR@n (no embedding model needed)")
    trust_remote_code: bool = option(False, "let the embedding model run code from its folder")
    out_dir: Optional[str] = option(None, "where eval.md, eval.json, eval_vs_n.png go (default: beside the input)")
    no_plot: bool = option(False, "do not draw eval_vs_n.png")
    suite: bool = option(False, "the generalization table instead (sealong.evaluate.suite): every task of --before "
                         "vs --after (greedy samples files of any kind: LongBench v1, RULER, LongBench v2), paired")
    before: Optional[str] = option(None, "--suite: comma-separated greedy samples files of the model before")
    after: Optional[str] = option(None, "--suite: comma-separated greedy samples files of the model after")


@dataclass
class PipelineConfig(Checked):
    """`sealong pipeline`: every stage into one run directory, resumable.

    Options that "set" a stage's option pass their value to it when given (on the command line or in the
    `pipeline` section); left unset, each stage takes its own value (its section of --config, the preset, or
    its default).
    """

    stage: ClassVar[str] = "pipeline"
    run_dir: str = option("runs/sealong-demo", "everything goes here; re-running resumes")
    model: Optional[str] = option(None, "checkpoint folder; omitted: the offline demo's tiny model")
    musique: Optional[str] = option(None, "MuSiQue training questions; omitted: the built-in world")
    eval_files: Optional[str] = option(
        None, "comma-separated LongBench JSONL files; omitted: the built-in world's held-out questions")
    eval_samples: int = option(16, "samples per eval question for MBR@N / oracle@N", ge=1)
    tiny_warmup_steps: Optional[int] = option(
        None, "demo only: labelled training steps of the tiny base model before SEALONG starts (the base model's "
        "own training, not the learning-rate warmup, which is train.warmup_ratio); None: TinyConfig's (sealong/tiny.py)",
        ge=0)
    tiny_shape: Optional[str] = option(
        None, "demo only: the tiny base model's shape and warm-up, comma-separated TinyConfig field=value (sealong/tiny.py; "
        "e.g. num_layers=4,hidden_size=128,tie_embeddings=true,warmup_hops=1+2+3); None: TinyConfig's defaults")
    nproc_per_node: int = option(1, "processes (GPUs) of the torchrun jobs: data-parallel sampling and scoring, and "
                                 "training", ge=1)
    train_args: str = option("", "extra sealong.train flags, one string (e.g. \"--sp 8 --ulysses 4\")")
    embedding_model: Optional[str] = option(
        None, "embedder of MBR in scoring and of MBR@N in evaluation (score.model and eval.embed_model); default: "
        "theirs (the paper preset: jina-embeddings-v3 from a local folder; otherwise the offline all-MiniLM-L6-v2)")
    trust_remote_code: bool = option(
        False, "let the embedder of scoring and evaluation run code from its folder (score.trust_remote_code and "
        "eval.trust_remote_code; jina-embeddings-v3, the paper preset's embedder, is custom code and needs it)")
    rounds: int = option(
        1, "SEALONG rounds: round k samples fresh questions (its disjoint slice of a pool of num_examples x rounds) "
        "with round k-1's merged model, scores, trains a new LoRA on it, merges and evaluates, in run_dir/round_k/; "
        "1 = the paper's single round in run_dir itself", ge=1)
    stop_consensus: float = option(
        0.95, "rounds > 1: stop before training a round whose samples agree, i.e. whose mean top-cluster share "
        "(answer consensus) is at least this (no preference signal left); 1 stops only when every sample agrees",
        ge=0, le=1)
    min_pairs: Optional[int] = option(
        None, "stop before training a round (also the only one) with fewer pairs than this left after scoring; None: the "
        "training job's batch_pairs (one optimizer step; the trainer refuses fewer); 0 never stops for this", ge=0)
    # options of the stages, set for the whole run (None: the stage's value from --config, the preset or its default)
    seed: Optional[int] = option(None, "seed of every stage", sets=("synth", "sample", "score", "train"))
    num_examples: Optional[int] = option(None, "training questions", sets=("synth",))
    num_eval: Optional[int] = option(None, "held-out questions of the built-in world", sets=("synth",))
    min_tokens: Optional[int] = option(None, "shortest context", sets=("synth",))
    max_tokens: Optional[int] = option(None, "longest context", sets=("synth",))
    num_samples: Optional[int] = option(None, "N samples per training prompt", sets=("sample",))
    temperature: Optional[float] = option(None, "sampling temperature", sets=("sample",))
    max_new_tokens: Optional[int] = option(None, "longest output", sets=("sample",))
    dtype: Optional[Dtype] = option(None, "compute dtype", sets=("sample", "train"))
    mode: Optional[Literal["orpo", "sft"]] = option(None, "ORPO on pairs or SFT on the chosen", sets=("train",))
    lora_r: Optional[int] = option(None, "LoRA rank", sets=("train",))
    lora_alpha: Optional[int] = option(None, "LoRA alpha", sets=("train",))
    lr: Optional[float] = option(None, "peak learning rate", aliases=["learning_rate"], sets=("train",))
    epochs: Optional[int] = option(None, "passes over the pairs", aliases=["num_train_epochs"], sets=("train",))
    batch_pairs: Optional[int] = option(None, "pairs per optimizer step", sets=("train",))
    # beyond the paper (README "Beyond the paper"); None: the stage's own value (off by default)
    adaptive_block: Optional[int] = option(None, "adaptive sample count of the training samples: this many at a time "
                                           "per prompt (0: all N, the paper)", ge=0, sets=("sample",))
    adaptive_share: Optional[float] = option(None, "adaptive stop: top answer cluster share", gt=0, le=1,
                                             sets=("sample",))
    adaptive_min_samples: Optional[int] = option(None, "adaptive stop: at least this many samples", ge=1,
                                                 sets=("sample",))
    scorer: Optional[Literal[SCORERS]] = option(None, "mbr (the paper), self-certainty or mbr+certainty",
                                                sets=("score",))
    min_consensus: Optional[float] = option(None, "skip questions whose top answer cluster share is below this",
                                            ge=0, le=1, sets=("score",))
    pair_weighting: Optional[Literal["none", "margin"]] = option(None, "none (the paper) or margin: pairs weighted by "
                                                                 "their score margin", sets=("train",))


STAGES = {  # name -> (config class, module with run(cfg) and main(argv), one-line help)
    "synth": (SynthConfig, "sealong.data.synthetic", "synthesize long-context training prompts (and a held-out eval file)"),
    "sample": (SampleConfig, "sealong.sample.sampler", "sample N outputs per prompt (shared-prefix sampler)"),
    "score": (ScoreConfig, "sealong.score.stage", "score samples by MBR and select preference pairs"),
    "train": (TrainConfig, "sealong.train.loop", "fine-tune on the pairs (ORPO or SFT, LoRA), launched through torchrun"),
    "eval": (EvalConfig, "sealong.evaluate.report", "SubEM / F1 tables: greedy, MBR@N, oracle@N, random@N, and the plot"),
    "pipeline": (PipelineConfig, "sealong.pipeline", "run every stage into one run directory (no arguments: the offline demo)"),
}
