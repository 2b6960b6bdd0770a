"""ModelConfig: every shape and constant of a Llama-3.x / Qwen-2.5 decoder, read from a checkpoint's config.json.

Both the Hugging Face layouts of rotary settings are accepted: the classic one (`rope_theta` and
`rope_scaling` at the top level, as Meta's and Qwen's published checkpoints have it) and transformers 5's
`rope_parameters` dict.
"""

import json
import os
from dataclasses import asdict, dataclass, field

# architecture name in config.json -> (qkv projections have a bias, o_proj has a bias)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"  # "LlamaForCausalLM" or "Qwen2ForCausalLM"
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336  # SwiGLU inner width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # GQA: query head h reads kv head h // (num_attention_heads // num_key_value_heads)
    head_dim: int = 128  # read from config.json when present, else hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or {"rope_type": "linear", "factor"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072  # the model's context limit (prompt + new tokens)
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight
    attention_bias: bool = False  # bias on q, k, v projections (always on for Qwen2)
    attention_out_bias: bool = False  # bias on o_proj (Llama's attention_bias sets both)
    mlp_bias: bool = False  # bias on gate, up, down projections
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)  # every id that ends generation

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(cfg.get("model_type"), cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
        if cfg.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
            if scaling["rope_type"] == "default":
                scaling = None
        heads = cfg.get("num_attention_heads")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"{source}: 'num_attention_heads' must be a positive integer, got {heads!r}")
        eos = cfg.get("eos_token_id")
        qwen = arch == "Qwen2ForCausalLM"
        try:
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=True if qwen else bool(cfg.get("attention_bias", False)),
                attention_out_bias=False if qwen else bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            )
        except KeyError as err:
            raise ValueError(f"{source}: missing field {err.args[0]!r}") from None
        except ValueError as err:  # __post_init__'s checks: say which file
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_folder(cls, folder: str) -> "ModelConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in checkpoint folder {folder!r}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict:
        return asdict(self)

    def get(self, key, default=None):
        """dict-style access, so libraries that probe `model.config.get(...)` (peft) work."""
        return getattr(self, key, default)
