"""RULER-style synthetic long-context tasks, generated locally (Hsieh et al. 2024, "RULER: What's the Real Context
Size of Your Long-Context Language Models?", arXiv 2404.06654; its public generation scripts NVIDIA/RULER
scripts/data/synthetic/*.py define the tasks, templates and scoring followed here).

Tasks (RULER's names in parentheses), each record a prompt at a target length with its expected strings:
    niah_single      one needle "One of the special magic numbers for {key} is: {value}." in the haystack,
                     asked for its value                                                      (niah_single_1)
    niah_multikey    four needles with different keys, one asked                              (niah_multikey_1)
    niah_multivalue  one key with four values, all asked                                      (niah_multivalue)
    niah_multiquery  four keys, all four asked                                                (niah_multiquery)
    vt               variable tracking: a chain "VAR A = 12345", "VAR B = VAR A", ... (4 hops) spread through
                     the haystack, after one short solved example; asked for every variable holding the value
    cwe              common-word extraction: a numbered list where 10 words appear 30 times (6 below 4K) and the
                     others 3 times (1 below 4K), after one solved example; asked for the 10 most common
    fwe              frequent-word extraction: coded words drawn with Zipf counts (alpha 2), the top one replaced
                     by '...' (noise); asked for the three most frequent coded words
Haystacks, no download: "noise" = RULER's repeated sentences "The grass is green. The sky is blue. ..."; "passages"
= the MuSiQue paragraphs shipped with sealong (sealong/data/musique_sample.jsonl, CC BY 4.0), standing
in for RULER's Paul Graham essays: the first n words of them (n searched), needles inserted between sentences at
depths drawn from 40 evenly spaced ones.
Defaults as RULER's: noise for niah_single and vt, essays (here: passages) for the other needle tasks.

Length: a record's `length` = the tokens of its prompt as the sampler encodes it (the model's chat template around
the user message, `sealong.data.prompts.chat_token_ids`) + `tokens_to_generate` (RULER's budget of the task), as
RULER's max_seq_length; the haystack size is searched per record for the largest that fits the target, and a record
below 98% of it is an error. RULER appends an answer prefix after the chat template ("The special magic number for
... is"); sealong's sampler starts the assistant turn empty, so the prefix is kept in the record (`answer_prefix`)
but not in the prompt.

Randomness: record i of (task, target length) draws everything from random.Random(f"{seed}:{task}:{length}:{i}"):
the same seed gives the same records whatever else is generated. With `vocabulary` (a list of words the model's
tokenizer can write, e.g. the offline demo's closed word-level vocabulary) every key, value, variable name and list
word is drawn from it instead (numbers, uuids and coded words cannot be written by such a tokenizer), never one
that occurs in the haystack.

Scoring as RULER's scripts/eval: the prediction stripped and control characters replaced by newlines, then
string_match_all (the share of the expected strings found, case-insensitive, in the prediction; niah, vt, cwe, fwe)
or string_match_part (1 if any is found; RULER's QA tasks).
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
DEPTHS = [round(100 * k / 39) for k in range(40)]  # RULER: np.linspace(0, 100, 40) rounded

TEMPLATES = {  # RULER's task templates (context and query filled in); answer prefixes kept aside
    "niah": ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will "
             "quiz you about the {type_v} afterwards.\n{context}\nWhat are all the special magic {type_v} for {query} "
             "mentioned in the provided text?",
             " The special magic {type_v} for {query} mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
            "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:"),
}


@dataclass(frozen=True)
class Task:
    kind: str  # niah, vt, cwe, fwe
    tokens_to_generate: int
    haystack: str = "noise"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    metric: str = "string_match_all"


TASKS = {
    "niah_single": Task("niah", 128, "noise"),
    "niah_multikey": Task("niah", 128, "passages", num_k=4),
    "niah_multivalue": Task("niah", 128, "passages", num_v=4),
    "niah_multiquery": Task("niah", 128, "passages", num_k=4, num_q=4),
    "vt": Task("vt", 30, "noise"),
    "cwe": Task("cwe", 120),
    "fwe": Task("fwe", 50),
}
LENGTHS = (4096, 8192, 16384, 32768)

_ADJECTIVES = ("amber brave calm dusty eager fancy gentle hollow icy jolly keen lively mellow noble oval plain quiet "
               "rapid silent tidy upbeat vivid witty young zesty bitter clever damp early fresh grand humble "
               "ivory jagged kind lucky misty narrow odd polite").split()
_NOUNS = ("anchor basket candle desert engine falcon garden harbor island jacket kettle ladder meadow needle orchard "
          "pepper quarry river saddle tunnel umbrella valley window yacht zebra badger cactus dolphin ember forest "
          "glacier hammer igloo jungle kayak lantern marble nectar oyster pillow quilt rocket spiral thistle "
          "violin walnut").split()
_SYLLABLES = ("ba be bi bo bu da de di do du fa fe fi fo ga ge gi go ka ke ki ko la le li lo ma me mi mo na ne ni no "
              "pa pe pi po ra re ri ro sa se si so ta te ti to va ve vi vo za ze zi zo").split()


@dataclass
class RulerConfig:
    tasks: tuple = tuple(TASKS)
    lengths: tuple = LENGTHS
    per_task: int = 25  # records per task and length
    seed: int = 0
    haystack: str | None = None  # "noise" or "passages" for every needle / vt task; None: each task's own
    tokens_to_generate: int | None = None  # None: each task's RULER budget
    vocabulary: list | None = None  # draw every key / value / word from these (see the module docstring)
    passages: list = field(default_factory=list)  # haystack texts for "passages" (default: the shipped MuSiQue)
    tolerance: float = 0.02


def shipped_passages() -> list[str]:
    """The paragraph texts of the MuSiQue samples shipped with sealong (sealong/data/*.jsonl), in file order."""
    texts, seen = [], set()
    for name in ("musique_sample.jsonl", "musique_mixed_sample.jsonl"):
        for line in (Path(__file__).parent / name).open(encoding="utf-8"):
            if line.strip():
                for p in json.loads(line)["paragraphs"]:
                    if p["paragraph_text"] not in seen:
                        seen.add(p["paragraph_text"])
                        texts.append(p["paragraph_text"])
    return texts


def sentences_of(texts: list[str]) -> list[str]:
    """The texts split into sentences (after ., ! or ? followed by white space), white space collapsed."""
    out = []
    for t in texts:
        out += [s for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split())) if s]
    return out


def pseudo_words(n: int, rng: random.Random) -> list[str]:
    """n distinct made-up lowercase words of three syllables (the list words beyond the built-in ones)."""
    out, seen = [], set(_ADJECTIVES) | set(_NOUNS)
    while len(out) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(3))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


class Generator:
    """Builds the records of one (task, target length, index) and searches the haystack size that fits."""

    def __init__(self, tokenizer, config: RulerConfig):
        self.tok, self.cfg = tokenizer, config
        self.hay_words = " ".join(sentences_of(config.passages or shipped_passages())).split()
        fixed = [NOISE, NEEDLE] + [t for pair in TEMPLATES.values() for t in pair]
        self.fixed_text = " ".join(self.hay_words + fixed).lower()  # any text a needle's value must not be part of
        vocab = config.vocabulary
        self.words = sorted(set(vocab)) if vocab else None  # list words (cwe, fwe: no haystack)
        self.vocab = sorted({w for w in vocab if w.lower() not in self.fixed_text}) if vocab else None  # needles
        if self.vocab is not None and len(self.vocab) < 16:
            raise ValueError(f"ruler: only {len(self.vocab)} vocabulary words occur nowhere in the haystack; need 16")

    # ---- tokens ----------------------------------------------------------------------------------------------
    def prompt_tokens(self, message: str) -> int:
        from .prompts import chat_token_ids

        if getattr(self.tok, "chat_template", None):
            return len(chat_token_ids(self.tok, message))
        return len(self.tok(message)["input_ids"])

    # ---- draws -----------------------------------------------------------------------------------------------
    def _key(self, rng):
        return rng.choice(self.vocab) if self.vocab else f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"

    def _value(self, rng):
        if self.vocab:
            return rng.choice(self.vocab)
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # RULER: 7-digit numbers

    def _sentences(self, n: int, haystack: str) -> list[str]:
        if haystack == "noise":
            return [NOISE] * n
        words = self.hay_words  # RULER's essay haystack: the first n words (repeated if need be), as sentences
        text = " ".join(words[i % len(words)] for i in range(n))
        return [x for x in re.split(r"(?<=[.!?])\s+", text) if x]

    # ---- tasks -----------------------------------------------------------------------------------------------
    def niah(self, task: Task, n: int, rng: random.Random) -> tuple[str, list, dict]:
        keys, values, needles, used = [], [], [], []

        def fresh(x):  # neither part of another key / value nor of the haystack and templates: found once
            ok = x.lower() not in self.fixed_text and not any(x in u or u in x for u in used)
            if ok:
                used.append(x)
            return ok

        while len(keys) < max(task.num_k, task.num_q):
            k = self._key(rng)
            if fresh(k):
                keys.append(k)
        for k in keys:
            vs = []
            while len(vs) < task.num_v:
                v = self._value(rng)
                if fresh(v):
                    vs.append(v)
            values.append(vs)
            needles += [NEEDLE.format(type_v="numbers", key=k, value=v) for v in vs]
        rng.shuffle(needles)
        sents = self._sentences(n, task.haystack)
        if task.haystack == "noise":  # RULER: needles at random sentence indexes, lines joined by newlines
            for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                sents.insert(index, needle)
            context = "\n".join(sents)
        else:  # essay-like: needles between sentences at drawn depths
            context = self._insert_at_depths(sents, needles, rng)
        asked = rng.sample(range(len(keys)), task.num_q)
        query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if len(asked) > 1 else keys[asked[0]]
        answers = [v for i in asked for v in values[i]]
        template, prefix = TEMPLATES["niah"]
        type_v = "numbers"
        if task.num_q * task.num_v == 1:  # RULER's singular wording
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            prefix = prefix.replace("are", "is")
            type_v = "number"
        return (template.format(type_v=type_v, context=context, query=query), answers,
                {"answer_prefix": prefix.format(type_v=type_v, query=query), "query": query})

    def _insert_at_depths(self, sents, inserts, rng):
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(inserts))) + [len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(inserts):
                parts.append(inserts[i - 1])
        return " ".join(p for p in parts if p)

    def _chain(self, rng, hops=4, short=False):
        names = []
        while len(names) < hops + 1:
            name = rng.choice(self.vocab) if self.vocab else "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        value = "12345" if short and not self.vocab else self._value(rng) if self.vocab else str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
        return names, chain, value

    def vt(self, task: Task, n: int, rng: random.Random, example: bool = True):
        names, chain, value = self._chain(rng)
        sents = self._sentences(n, task.haystack)
        if task.haystack == "noise":
            for j, pos in enumerate(sorted(rng.sample(range(len(sents)), len(chain)))):
                sents.insert(pos + j, chain[j])
            context = "\n".join(sents)
        else:
            context = self._insert_at_depths(sents, [c.strip() + "." for c in chain], rng)
        context = context.replace(". \n", ".\n")
        template, prefix = TEMPLATES["vt"]
        text = template.format(context=context, query=value)
        meta = {"answer_prefix": prefix.format(num_v=len(names), query=value), "query": value}
        if example:  # RULER: one solved example of the same kind (few noise lines) before the question
            ex_text, ex_names, ex_meta = self.vt(task, 5, rng, example=False)
            text = ex_text + ex_meta["answer_prefix"] + " ".join(ex_names) + "\n\n" + text
        return text, names, meta

    def _word_list(self, num_words, rng):
        if self.words:
            pool = list(self.words)
            num_words = min(num_words, len(pool))  # a closed vocabulary caps the list's distinct words
        else:
            base = sorted(set(_ADJECTIVES) | set(_NOUNS))  # then made-up words (RULER: a larger word list)
            pool = base + pseudo_words(max(0, num_words - len(base)), rng)
        if num_words > len(pool):
            raise ValueError(f"ruler cwe: {num_words} distinct words needed, the vocabulary has {len(pool)}")
        return rng.sample(pool, num_words)

    def cwe(self, task: Task, n: int, rng: random.Random):
        small = self.target < 4096  # RULER: fewer repeats below 4K
        template, prefix = TEMPLATES["cwe"]

        def example(num_words, common, uncommon):
            words = self._word_list(num_words, rng)
            top, rest = words[:10], words[10:]
            listed = top * common + rest * uncommon
            rng.shuffle(listed)
            return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top

        ex_context, ex_top = example(20, 3, 1) if small else example(40, 10, 3)
        context, top = example(max(n, 11), 6, 1) if small else example(max(n, 11), 30, 3)
        shot = template.format(context=ex_context) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top))
        return shot + "\n" + template.format(context=context), top, {"answer_prefix": prefix, "query": ""}

    def fwe(self, task: Task, n: int, rng: random.Random, alpha: float = 2.0):
        size = max(10, self.target // 50)  # RULER: vocab_size = max_seq_length // 50
        if self.words:
            size = min(size, len(self.words))
        vocab = set()
        while len(vocab) < size:
            vocab.add(rng.choice(self.words) if self.words else "".join(rng.choices(string.ascii_lowercase, k=6)))
        vocab = sorted(vocab)
        rng.shuffle(vocab)
        vocab[0] = "..."  # RULER: the top-ranked word is noise
        z = _zeta(alpha)
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -alpha / z))]
        rng.shuffle(words)
        template, prefix = TEMPLATES["fwe"]
        return template.format(context=" ".join(words)), vocab[1:4], {"answer_prefix": prefix, "query": ""}

    # ---- length search ---------------------------------------------------------------------------------------
    def build(self, name: str, target: int, index: int) -> dict:
        task = TASKS[name]
        if self.cfg.haystack and task.kind in ("niah", "vt"):
            task = Task(**{**task.__dict__, "haystack": self.cfg.haystack})
        budget = self.cfg.tokens_to_generate if self.cfg.tokens_to_generate is not None else task.tokens_to_generate
        self.target = target
        seed = f"{self.cfg.seed}:{name}:{target}:{index}"
        make = getattr(self, task.kind)

        def at(n):
            text, answers, meta = make(task, n, random.Random(seed))
            return text, answers, meta, self.prompt_tokens(text) + budget

        lo, hi, best = 8, 16, None  # at least 8 haystack units: room for every needle / chain line
        while at(hi)[3] <= target:  # grow the bracket, then bisect: largest haystack size within the target
            lo, hi = hi, hi * 2
            if hi > 1 << 24:
                raise ValueError(f"ruler {name}: the prompt stops growing below {target} tokens (too few words)")
        while lo <= hi:
            mid = (lo + hi) // 2
            got = at(mid)
            if got[3] <= target:
                best, lo = (mid, got), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise ValueError(f"ruler {name}: even the smallest haystack exceeds {target} tokens (with {budget} to "
                             "generate)")
        n, (text, answers, meta, length) = best
        floor = (1 - self.cfg.tolerance) * target
        if length < floor:  # the draws change with the size, so length is not monotone in it: look nearby
            for m in [n + d for d in range(1, 65)] + [n - d for d in range(1, 65) if n - d >= 8]:
                got = at(m)
                if floor <= got[3] <= target:
                    n, (text, answers, meta, length) = m, got
                    break
        if length < floor:
            raise ValueError(f"ruler {name}: {length} tokens is more than {self.cfg.tolerance:.0%} below the target "
                             f"{target} (the haystack grows in steps too coarse for this length)")
        return {"id": f"ruler/{name}/{target}/{index}", "dataset": f"ruler_{name}_{_label(target)}", "task": name,
                "prompt": text, "context": "", "question": meta["query"], "answers": list(answers),
                "metric": task.metric, "length": length, "target_length": target, "tokens_to_generate": budget,
                "haystack": task.haystack if task.kind in ("niah", "vt") else "words", "haystack_units": n,
                "answer_prefix": meta["answer_prefix"], "kind": "ruler"}


def _zeta(alpha: float, terms: int = 10000) -> float:
    """Riemann zeta(alpha) for alpha > 1: the partial sum plus its Euler-Maclaurin tail (error below 1e-12)."""
    s = sum(k ** -alpha for k in range(1, terms))
    return s + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms ** -alpha


def _label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def generate(tokenizer, config: RulerConfig | None = None) -> list[dict]:
    """Every (task, length, index) record of `config`, in that order."""
    cfg = config or RulerConfig()
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"ruler: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    gen = Generator(tokenizer, cfg)
    return [gen.build(t, n, i) for t in cfg.tasks for n in cfg.lengths for i in range(cfg.per_task)]


# ---- scoring (RULER scripts/eval) -----------------------------------------------------------------------------

def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def match_all(prediction: str, refs: list[str]) -> float:
    """One prediction's string_match_all: the share of the expected strings in it (case-insensitive)."""
    pred = postprocess(prediction).lower()
    return sum(r.lower() in pred for r in refs) / len(refs)


def match_part(prediction: str, refs: list[str]) -> float:
    """One prediction's string_match_part: 1 if any expected string is in it (case-insensitive)."""
    pred = postprocess(prediction).lower()
    return float(max(r.lower() in pred for r in refs))


METRICS = {"string_match_all": match_all, "string_match_part": match_part}


def score(predictions: list[str], refs: list[list[str]], metric: str = "string_match_all") -> float:
    """A task's RULER score: the mean per-prediction score x 100, rounded to 2 decimals (as RULER reports)."""
    fn = METRICS[metric]
    return round(100 * sum(fn(p, r) for p, r in zip(predictions, refs)) / len(predictions), 2)


def check_writable(tokenizer, records: list[dict]) -> None:
    """Every expected string survives the tokenizer (encode, decode): a model could write it."""
    for r in records:
        for a in r["answers"]:
            back = tokenizer.decode(tokenizer(a, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
            if a.lower() not in back.lower().replace(" ", "") and a.lower() not in back.lower():
                raise ValueError(f"ruler {r['id']}: the tokenizer cannot write the answer {a!r} (decodes to {back!r}); "
                                 "pass a vocabulary the tokenizer knows")


def synth_ruler(args, tokenizer) -> int:
    """`sealong synth --ruler`: <out-dir>/ruler.jsonl, one evaluation record per (task, length, index)."""
    import logging

    from sealong import jsonl

    out = Path(args.out_dir) / "ruler.jsonl"
    if out.exists() and not args.overwrite:
        logging.getLogger("sealong.synth").info(f"{out} exists, skipping (--overwrite to rebuild)")
        return 0
    try:
        lengths = tuple(int(x) for x in str(args.ruler_lengths).split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--ruler-lengths: expected comma-separated integers, got {args.ruler_lengths!r}") from None
    cfg = RulerConfig(tasks=tuple(t.strip() for t in args.ruler_tasks.split(",") if t.strip()), lengths=lengths,
                      per_task=args.ruler_per_task, seed=args.seed, haystack=args.ruler_haystack)
    records = generate(tokenizer, cfg)
    check_writable(tokenizer, records)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = jsonl.write_jsonl_atomic(str(out), records)
    logging.getLogger("sealong.synth").info(f"wrote {n} RULER records ({', '.join(cfg.tasks)} at "
                                            f"{', '.join(map(str, lengths))} tokens) to {out}")
    return 0
