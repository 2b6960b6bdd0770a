"""The reading world: fresh facts for every question, so an answer can only be read from its context.

Each question draws new entities (people `First Last`, cities, countries, companies, from word lists an
English sentence embedder knows) and new facts; nothing carries over from one question to the next, so a model
cannot memorize the world and must read the passages. A question follows 2 or 3 relations from a person:

    What is the country of the birthplace of the mother of Ada Moss?

Its record holds `paragraphs_per_record` passages (default 10): the chain's subjects (supporting), one
near-name confuser per chain subject (same first name or same surname, the same relation, another object: a
passage a careless reader copies from) and filler entities with facts of their own. Every passage states two
fact `The {relation} of {subject} is {object}.` (short passages keep a CPU demo cheap). The records are MuSiQue-format (`2hop__read...`), so the
context builder, sampler, scoring and evaluation run on them as on MuSiQue.

The gold reasoning (used only by the tiny model's labelled warm-up) comes in `len(TRACE_FORMS)` paraphrased
forms, so that a model's probability spreads over several paths to the same answer, as a real model's does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .musique import Paragraph
from .world import RELATIONS as FIXED_RELATIONS
from .world import Question

FIRST = ("Ada Alan Anna Ben Carl Clara Dan Dora Eli Emma Eva Finn Gina Hugo Ida Ivan Jack Jane Kim Leo Lily Lola "
         "Luke Max Mia Nina Noah Omar Paul Rosa Ruth Sam Sara Tom Vera Zoe").split()
LAST = ("Adams Baker Bell Brook Burns Carter Clark Cole Cook Cruz Dean Fox Ford Gray Hale Hart Hill Hunt Kane "
        "King Lane Long Marsh Moss Nash Page Park Pike Price Reed Rose Ross Shaw Stone Wade Ward West Wolf Young").split()
CITIES = ("Oslo Lyon Porto Quito Lima Cairo Dakar Delhi Perth Tokyo Osaka Seoul Paris Rome Milan Vienna Prague "
          "Dublin Boston Denver Austin Dallas Miami Havana Bogota Santiago Madrid Bern Zurich Geneva Munich Berlin "
          "Hamburg Warsaw Krakow Riga Tallinn Helsinki Stockholm Bergen").split()
COUNTRIES = ("Norway France Portugal Ecuador Peru Egypt Senegal India Australia Japan Korea Italy Austria "
             "Ireland Spain Chile Mexico Cuba Poland Latvia Finland Sweden Canada Brazil Kenya Ghana Nepal Chad").split()
COMPANY_WORDS = ("Apex Blue Cedar Delta Echo Falcon Granite Harbor Iron Jade Lunar Maple Nova Orbit Pine Quartz "
                 "Raven Silver Tiger Union").split()
COMPANY_KINDS = ("Works", "Labs", "Foods", "Motors")

# relation -> (subject type, object type), the fixed world's relations (sealong.data.world) less `currency`, in
# this world's order (the order seeds draw from); a chain starts at a person
RELATIONS = {r: FIXED_RELATIONS[r] for r in ("mother", "employer", "birthplace", "founder", "headquarters",
                                                 "country", "capital")}
TRACE_FORMS = (
    ("The {rel} of {s} is {o}.", "The answer is {a}."),
    ("{s} has the {rel} {o}.", "So the answer is {a}."),
    ("We need the {rel} of {s}: it is {o}.", "The answer is {a}."),
)


@dataclass
class FreshWorldConfig:
    paragraphs_per_record: int = 10  # chain passages + confusers + fillers (8-12 recommended)
    hops: tuple[int, ...] = (2, 3)  # hop counts, cycled through
    seed: int = 0


@dataclass
class FreshQuestion(Question):
    """A question of the reading world: `Question`'s text, record and MuSiQue layout, paraphrased traces."""

    form: int = 0  # which paraphrased trace form `reasoning()` uses by default
    confusers: tuple = ()  # (near-name subject, relation, other object) per chain step: the careless reader's copies

    def reasoning(self, form: int | None = None) -> str:
        """The gold trace in one of the paraphrased forms (labelled warm-up only)."""
        step, end = TRACE_FORMS[self.form if form is None else form]
        return " ".join(step.format(rel=r, s=s, o=o) for s, r, o in self.chain) + " " + end.format(a=self.answer)


class FreshWorld:
    """`questions(n)`: n questions, each with its own entities and facts, drawn from `random.Random(seed)`."""

    def __init__(self, config: FreshWorldConfig | None = None):
        self.config = config or FreshWorldConfig()
        if self.config.paragraphs_per_record < 2 * max(self.config.hops):
            raise ValueError(f"paragraphs_per_record={self.config.paragraphs_per_record} must hold the chain and its "
                             f"confusers (>= {2 * max(self.config.hops)})")

    # -- entities -------------------------------------------------------------------------------------------
    @staticmethod
    def _new(kind: str, rng: random.Random, used: set[str]) -> str:
        while True:
            if kind == "person":
                name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            elif kind == "company":
                name = f"{rng.choice(COMPANY_WORDS)} {rng.choice(COMPANY_KINDS)}"
            else:
                name = rng.choice(CITIES if kind == "city" else COUNTRIES)
            if name not in used:
                used.add(name)
                return name

    @staticmethod
    def _near(name: str, kind: str, rng: random.Random, used: set[str]) -> str:
        """A near-name of `name`: one of its two words replaced (people, companies); another name otherwise."""
        if kind not in ("person", "company"):
            return FreshWorld._new(kind, rng, used)
        first, last = name.split(" ", 1)
        pools = (FIRST, LAST) if kind == "person" else (COMPANY_WORDS, COMPANY_KINDS)
        for _ in range(100):
            cand = f"{first} {rng.choice(pools[1])}" if rng.random() < 0.5 else f"{rng.choice(pools[0])} {last}"
            if cand not in used:
                used.add(cand)
                return cand
        return FreshWorld._new(kind, rng, used)

    def _facts_of(self, subject: str, kind: str, rng, used, fixed: tuple[str, str] | None = None) -> str:
        """The fact sentence of `subject`'s passage: `fixed` (relation, object) if given, else a random one."""
        if fixed is None:
            rel = rng.choice([r for r, (st, _) in RELATIONS.items() if st == kind])
            fixed = (rel, self._new(RELATIONS[rel][1], rng, used))
        return f"The {fixed[0]} of {subject} is {fixed[1]}."

    # -- questions ------------------------------------------------------------------------------------------
    def question(self, index: int, prefix: str = "read") -> FreshQuestion:
        """Question `index`: its own generator `Random(f"{seed}:{index}")`, so any subset is the same questions."""
        cfg = self.config
        rng = random.Random(f"fresh:{cfg.seed}:{index}")
        hops = cfg.hops[index % len(cfg.hops)]
        used: set[str] = set()
        node, kind = self._new("person", rng, used), "person"
        chain = []
        for _ in range(hops):
            rel = rng.choice([r for r, (st, _) in RELATIONS.items() if st == kind
                              and not (len(chain) == hops - 1 and RELATIONS[r][1] == "person")])
            obj = self._new(RELATIONS[rel][1], rng, used)
            chain.append((node, rel, obj))
            node, kind = obj, RELATIONS[rel][1]
        passages, confusers = [], []
        for s, rel, o in chain:  # the chain's subjects, each with a near-name confuser of the same relation
            skind = RELATIONS[rel][0]
            passages.append((s, self._facts_of(s, skind, rng, used, (rel, o)), True))
            near = self._near(s, skind, rng, used)
            confusers.append((near, rel, self._new(RELATIONS[rel][1], rng, used)))
            passages.append((near, self._facts_of(near, skind, rng, used, confusers[-1][1:]), False))
        while len(passages) < cfg.paragraphs_per_record:
            skind = rng.choice(["person", "person", "company", "city"])
            s = self._new(skind, rng, used)
            passages.append((s, self._facts_of(s, skind, rng, used), False))
        rng.shuffle(passages)
        paragraphs = [Paragraph(i, t, text, sup) for i, (t, text, sup) in enumerate(passages)]
        return FreshQuestion(f"{hops}hop__{prefix}{cfg.seed}_{index}", chain, paragraphs,
                             form=rng.randrange(len(TRACE_FORMS)), confusers=tuple(confusers))

    def questions(self, n: int, start: int = 0) -> list[FreshQuestion]:
        return [self.question(i) for i in range(start, start + n)]

    @staticmethod
    def corpus() -> list[str]:
        """Every word the world can write (for a closed-vocabulary tokenizer)."""
        words = FIRST + LAST + CITIES + COUNTRIES + COMPANY_WORDS + list(COMPANY_KINDS) + list(RELATIONS)
        forms = [s + " " + e for s, e in TRACE_FORMS]
        return [" ".join(words), "What is the of ? The answer is .", *forms]


def world_config(hops: str | tuple = "2+3", passages: int = 10, seed: int = 0) -> FreshWorldConfig:
    """The world of `sealong synth --world-hops 1+2 --world-passages 6` (hops as `a+b` or a tuple)."""
    if isinstance(hops, str):
        hops = tuple(int(h) for h in hops.split("+"))
    return FreshWorldConfig(paragraphs_per_record=passages, hops=tuple(hops), seed=seed)


def fresh_questions(seed: int, num_train: int, num_eval: int = 0, num_warmup: int = 0, num_dev: int = 0,
                    config: FreshWorldConfig | None = None) -> dict[str, list[FreshQuestion]]:
    """Disjoint question sets, always in this order: train, eval, warmup, dev (dev = labelled warm-up slice
    held out from the warm-up's gradient steps, used to decide when to stop it; never the eval questions)."""
    cfg = FreshWorldConfig(**{**(config.__dict__ if config else {}), "seed": seed})
    world = FreshWorld(cfg)
    sizes = {"train": num_train, "eval": num_eval, "warmup": num_warmup, "dev": num_dev}
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = world.questions(n, start)
        start += n
    return out
