"""Load a Llama-3.x / Qwen-2.5 checkpoint folder: config.json, safetensors (single or sharded), tokenizer.

Weights are read from safetensors only (no pickle), and `trust_remote_code` is off unless asked for.
"""

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .llama import Transformer

# checkpoint keys that carry no weights of ours (old checkpoints saved the rotary buffer)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a checkpoint: the shards named by model.safetensors.index.json, or model.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
        for name in files:
            if os.path.basename(name) != name:
                raise ValueError(f"{index}: shard name {name!r} is not a plain file name")
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder!r} (only safetensors weights are read)")


def _read_weights(path, config, expected, state, dtype, device) -> None:
    """The weights of one safetensors file into `state`, each checked: an expected name and shape, finite values
    (a NaN or inf weight makes every output NaN: refused here, before a sampler writes NaN log-probs or a trainer
    blames its learning rate)."""
    with safe_open(path, framework="pt", device="cpu") as f:
        for key in f.keys():
            if key.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and key == "lm_head.weight"):
                continue
            if key not in expected:
                raise ValueError(f"{path}: unexpected weight {key!r} for {config.architecture}")
            tensor = f.get_tensor(key)
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(f"{path}: weight {key!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[key].shape)}")
            bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
            if bad:
                raise ValueError(f"{path}: weight {key!r} holds {bad} non-finite value(s) (NaN or inf): the checkpoint "
                                 "itself is broken (not a sampling or learning-rate setting)")
            state[key] = tensor.to(device=device, dtype=dtype)


def load_model(folder: str, dtype=torch.bfloat16, device="cpu", config: ModelConfig | None = None) -> Transformer:
    """Build the model on the meta device and fill it from the checkpoint's safetensors, cast to `dtype` on `device`."""
    config = config or ModelConfig.from_folder(folder)
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state = {}
    for path in safetensors_files(folder):
        try:
            _read_weights(path, config, expected, state, dtype, device)
        except SafetensorError as err:  # a truncated or corrupt file: name it, not a raw traceback
            raise ValueError(f"{path}: not a readable safetensors file ({err}); re-copy or re-save the checkpoint") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_tokenizer(folder: str, trust_remote_code: bool = False):
    """transformers' AutoTokenizer for the folder (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def eos_token_ids(folder: str, tokenizer=None) -> list[int]:
    """Every id that ends generation: config.json's, generation_config.json's and the tokenizer's eos ids."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids += [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))
