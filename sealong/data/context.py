"""Long-context builder: a question's supporting paragraphs plus distractors, shuffled, up to a token budget.

Per record (as SEALONG's data synthesis, with MuSiQue's own paragraphs standing in for full Wikipedia articles):

1. target = an integer drawn uniformly from [min_tokens, max_tokens] (default 4096..31744, the paper's 4K..31K),
   counted with the model's tokenizer;
2. every supporting paragraph is kept, always; if they alone exceed the target the record says so
   (`supporting_over_budget`) and the context holds them only;
3. distractors are added while they fit: first the record's OWN non-supporting paragraphs, in random order
   (`own_distractors="first"`, the authors' code: MuSiQue's retrieved, confusable paragraphs of the same question),
   then paragraphs of OTHER records (never one sharing a title with a supporting paragraph) in random order (the
   paper) or nearest to the question by embedding first (`distractors="nearest"`, a faiss inner-product index over
   unit embeddings). `own_distractors="skip"` draws from other records only (sealong's earlier behaviour: easier
   contexts);
4. the kept paragraphs are shuffled and written as `Passage i:\\n{title}\\n{text}` blocks separated by a blank line.

Everything is drawn from `random.Random(f"{seed}:{record id}")`: the same seed gives the same context for a record
whatever the order or subset of records. The final context is re-tokenized as a whole and distractors are dropped
until it fits, so `context_tokens <= target_tokens` holds exactly unless the supporting paragraphs alone are longer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sealong.config.stages import SynthConfig

from .musique import MusiqueRecord, Paragraph

SEPARATOR = "\n\n"


@dataclass
class ContextConfig:
    """The builder's settings; the defaults are the `synth` stage's (SynthConfig, sealong/config/stages.py: the one
    place they and their help are written)."""

    min_tokens: int = SynthConfig.min_tokens  # lower end of the uniform target length (model tokens)
    max_tokens: int = SynthConfig.max_tokens  # upper end (31K, the paper's randint(4, 31) * 1024)
    distractors: str = SynthConfig.distractors  # "random" (paper) or "nearest" (by embedding, via faiss)
    own_distractors: str = SynthConfig.own_distractors  # "first" (authors' code) or "skip" (other records only)
    embed_model: str | None = SynthConfig.embed_model  # sentence-transformers model for "nearest"; None = offline MiniLM
    seed: int = SynthConfig.seed
    max_misses: int = 64  # stop filling after this many consecutive distractors that do not fit

    def validate(self) -> None:
        if self.min_tokens < 1 or self.max_tokens < self.min_tokens:
            raise ValueError(f"min_tokens/max_tokens: need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
        if self.distractors not in ("random", "nearest"):
            raise ValueError(f"distractors: expected 'random' or 'nearest', got {self.distractors!r}")
        if self.own_distractors not in ("first", "skip"):
            raise ValueError(f"own_distractors: expected 'first' or 'skip', got {self.own_distractors!r}")


def format_passage(i: int, p: Paragraph) -> str:
    return f"Passage {i}:\n{p.title}\n{p.text}"


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` without special tokens (a Hugging Face tokenizer or anything with `encode`)."""
    return len(tokenizer.encode(text, add_special_tokens=False, verbose=False))


class ContextBuilder:
    """Holds the distractor pool (paragraphs of all records) and its token counts; `build(record)` per question."""

    def __init__(self, records: list[MusiqueRecord], tokenizer, config: ContextConfig | None = None, embedder=None):
        self.config = config or ContextConfig()
        self.config.validate()
        self.tokenizer = tokenizer
        self.pool: list[tuple[str, Paragraph]] = []  # (source record id, paragraph), deduplicated by (title, text)
        seen = set()
        for rec in records:
            for p in rec.paragraphs:
                if (p.title, p.text) not in seen:
                    seen.add((p.title, p.text))
                    self.pool.append((rec.id, p))
        self._cost: dict[int, int] = {}
        self._index, self._embedder = None, embedder  # embedder: anything with sentence-transformers' encode()
        if self.config.distractors == "nearest":
            self._build_index()

    # -- token costs ------------------------------------------------------------------------------------------
    def _block_cost(self, p: Paragraph) -> int:
        # a three-digit passage number and the separator: the exact count is checked on the final text
        return count_tokens(self.tokenizer, format_passage(999, p) + SEPARATOR)

    def _pool_cost(self, k: int) -> int:
        if k not in self._cost:
            self._cost[k] = self._block_cost(self.pool[k][1])
        return self._cost[k]

    # -- distractor order -------------------------------------------------------------------------------------
    def _build_index(self):
        import numpy as np

        from sealong.extras import require

        faiss = require("faiss", "faiss", "--distractors nearest")

        if self._embedder is None:
            import torch

            from ..score.embed import load_embedder  # the scoring stage's loader (cached)

            self._embedder = load_embedder(self.config.embed_model, "cuda" if torch.cuda.is_available() else "cpu")
        texts = [f"{p.title}\n{p.text}" for _, p in self.pool]
        emb = self._embedder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        self._index = faiss.IndexFlatIP(emb.shape[1])
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # faiss-gpu installed and a GPU present
            self._index = faiss.index_cpu_to_all_gpus(self._index)
        self._index.add(np.ascontiguousarray(emb, dtype="float32"))

    def _random_order(self, rng: random.Random):
        n = len(self.pool)
        if n <= 4096:  # small pool: a full permutation
            order = list(range(n))
            rng.shuffle(order)
            yield from order
            return
        seen = set()
        while len(seen) < n:  # large pool: lazy draws without replacement
            k = rng.randrange(n)
            if k not in seen:
                seen.add(k)
                yield k

    def _nearest_order(self, question: str, rng: random.Random):
        import numpy as np

        q = self._embedder.encode([question], normalize_embeddings=True, convert_to_numpy=True)
        k = min(len(self.pool), 512)
        _, idx = self._index.search(np.ascontiguousarray(q, dtype="float32"), k)
        near = [int(i) for i in idx[0] if i >= 0]
        yield from near
        near = set(near)
        yield from (i for i in self._random_order(rng) if i not in near)  # budget not filled: random for the rest

    # -- one record -------------------------------------------------------------------------------------------
    def build(self, rec: MusiqueRecord) -> dict:
        """The prompt record for `rec`: its training-safe fields plus `context` and the analysis fields."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}:{rec.id}")
        target = rng.randint(cfg.min_tokens, cfg.max_tokens)
        support = rec.supporting
        support_titles = {p.title for p in support}
        used = sum(self._block_cost(p) for p in support)
        kept: list[tuple[str, Paragraph]] = [(rec.id, p) for p in support]
        order = self._nearest_order(rec.question, rng) if cfg.distractors == "nearest" else self._random_order(rng)
        own: list[Paragraph] = []
        if cfg.own_distractors == "first":
            own = [p for p in rec.paragraphs if not p.is_supporting and p.title not in support_titles]
            rng.shuffle(own)
        misses, taken = 0, {(p.title, p.text) for p in support}
        for src, p, cost in self._candidates(rec, own, order, support_titles):
            if used >= target or misses >= cfg.max_misses:
                break
            if (p.title, p.text) in taken:  # MuSiQue repeats paragraphs across records: each at most once
                continue
            if used + cost <= target:
                kept.append((src, p))
                taken.add((p.title, p.text))
                used += cost
                misses = 0
            else:
                misses += 1
        n_support = len(support)
        perm = list(range(len(kept)))
        rng.shuffle(perm)
        while True:  # exact check on the assembled text; drop the last-added distractor while over budget
            context, passages = self._assemble(kept, perm, n_support)
            n_tokens = count_tokens(self.tokenizer, context)
            if n_tokens <= target or len(kept) == n_support:
                break
            drop = len(kept) - 1
            kept.pop()
            perm = [i for i in perm if i != drop]
        out = rec.prompt_fields()
        out.update(
            context=context,
            passages=passages,
            supporting_passages=[i + 1 for i, p in enumerate(passages) if p["supporting"]],
            target_tokens=target,
            context_tokens=n_tokens,
            supporting_over_budget=n_tokens > target,
        )
        return out

    def _candidates(self, rec, own, order, support_titles):
        """(source id, paragraph, token cost) in the order they are tried: own distractors, then the pool's."""
        for p in own:
            yield rec.id, p, self._block_cost(p)
        for k in order:
            src, p = self.pool[k]
            if src != rec.id and p.title not in support_titles:
                yield src, p, self._pool_cost(k)

    @staticmethod
    def _assemble(kept, perm, n_support):
        blocks, passages = [], []
        for i, j in enumerate(perm, 1):
            src, p = kept[j]
            blocks.append(format_passage(i, p))
            passages.append({"title": p.title, "supporting": j < n_support, "source": src})
        return SEPARATOR.join(blocks), passages


def build_contexts(records: list[MusiqueRecord], tokenizer, config: ContextConfig | None = None,
                   pool: list[MusiqueRecord] | None = None) -> list[dict]:
    """Contexts for `records`, distractors drawn from `pool` (default: the same records)."""
    builder = ContextBuilder(pool if pool is not None else records, tokenizer, config)
    return [builder.build(r) for r in records]
