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

This is the fixed world (`sealong synth --world fixed`: one set of facts, which a model can memorize);
sealong.data.fresh_world builds the default reading world on its `Question` and relations; the `synth` stage
(sealong.data.synthetic) uses both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .musique import MusiqueRecord, Paragraph, to_json

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
