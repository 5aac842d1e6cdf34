"""A Hugging Face config.json completed and read as transformers reads it.

transformers 5 saves the rotary settings as `rope_parameters` (rope_theta, rope_type and the
scaling); transformers 4 checkpoints have `rope_theta` and `rope_scaling` at the top level. Both
are read into one `rope_parameters` dict. A fact the converter needs that the config lacks is an
error naming the key, unless the architecture's transformers config class has a default that
transformers itself uses for a config without it (CLASS_DEFAULTS); each such use is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from .source import ModelLoadError

logger = logging.getLogger(__name__)

_COMMON = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": False}
# transformers 5.24's config class defaults that a config.json may leave out (tests check them
# against the classes). The sizes have class defaults too, but those are one checkpoint's values
# (Llama-2-7B's, Qwen2-7B's...): a config.json without them describes no model, so they are
# required. head_dim and num_key_value_heads default to what the class derives (see resolved).
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {**_COMMON, "max_position_embeddings": 2048},
    "MistralForCausalLM": {**_COMMON, "max_position_embeddings": 131072},
    "Qwen2ForCausalLM": {**_COMMON, "max_position_embeddings": 32768},
    "Qwen3ForCausalLM": {**_COMMON, "max_position_embeddings": 32768, "head_dim": 128},
}
SUPPORTED_ARCHITECTURES = tuple(CLASS_DEFAULTS)
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size")
# rope_type -> the keys of rope_parameters its frequencies need (transformers' validation).
# "dynamic" (NTK) changes the frequencies only past max_position_embeddings, which the engine
# never runs past (max_model_len is capped at it), so within it they are the default ones.
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
}


def resolved(hf: dict) -> dict:
    """config.json with every fact the converter reads present: the class defaults filled in
    and the rotary settings in `rope_parameters`, whichever form the file used."""
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in CLASS_DEFAULTS:
        raise ModelLoadError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    missing = [key for key in REQUIRED if hf.get(key) is None]
    if missing:
        raise ModelLoadError(f"config.json ({arch}) has no {', '.join(missing)}")
    out = dict(hf)

    def default(key: str, value: Any) -> None:
        if out.get(key) is None:
            logger.warning("config.json has no %s: using %r, the default of transformers' %s "
                           "config", key, value, arch.removesuffix("ForCausalLM"))
            out[key] = value

    for key, value in CLASS_DEFAULTS[arch].items():
        if key != "rope_theta":  # read with the other rotary settings
            default(key, value)
    default("num_key_value_heads", out["num_attention_heads"])
    default("head_dim", out["hidden_size"] // out["num_attention_heads"])
    if out["hidden_act"] != "silu":
        raise ModelLoadError(f"config.json: hidden_act {out['hidden_act']!r} is not supported "
                             "(the MLP is SwiGLU: silu)")
    out["rope_parameters"] = rope_parameters(hf, CLASS_DEFAULTS[arch]["rope_theta"],
                                             out["max_position_embeddings"])
    out.pop("rope_scaling", None)
    out.pop("rope_theta", None)
    out["sliding_window"] = sliding_window(hf)
    return out


# sliding_window of transformers' Mistral, Qwen2 and Qwen3 config classes; max_window_layers of
# its Qwen2 and Qwen3 ones.
DEFAULT_SLIDING_WINDOW = 4096
DEFAULT_MAX_WINDOW_LAYERS = 28


def sliding_window(hf: dict) -> int | None:
    """The attention window transformers applies for this config.json (None: every layer
    attends to the whole context). transformers' Llama has none (the key is inert there);
    Mistral's applies to every layer (the class default when the key is absent, none when it is
    null); Qwen2/Qwen3 use theirs only with use_sliding_window, on the layers of layer_types
    that say so (by default those from max_window_layers on). Another decoder (an Optimum
    export) is taken at its word: a window set is a window."""
    arch = (hf.get("architectures") or [None])[0]
    if arch == "LlamaForCausalLM":
        return None
    window = hf.get("sliding_window")
    if "sliding_window" not in hf and arch in ("MistralForCausalLM", "Qwen2ForCausalLM",
                                               "Qwen3ForCausalLM"):
        window = DEFAULT_SLIDING_WINDOW
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not hf.get("use_sliding_window"):
            return None
        layer_types = hf.get("layer_types")
        if not layer_types:
            first_sliding = hf.get("max_window_layers")
            if first_sliding is None:
                first_sliding = DEFAULT_MAX_WINDOW_LAYERS
                logger.warning("config.json has use_sliding_window but neither layer_types nor "
                               "max_window_layers: using %d, the default of transformers' %s "
                               "config", first_sliding, arch.removesuffix("ForCausalLM"))
            layer_types = ["sliding_attention" if i >= first_sliding else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
        if "sliding_attention" not in layer_types:
            return None
    if window is not None and "sliding_window" not in hf:
        logger.warning("config.json has no sliding_window: using %d, the default of "
                       "transformers' %s config", window, arch.removesuffix("ForCausalLM"))
    return window


def rope_parameters(hf: dict, default_theta: float, max_position_embeddings: int) -> dict:
    """The rotary settings as transformers 5 standardizes them (RotaryEmbeddingConfigMixin):
    `rope_scaling` (transformers 4) wins over `rope_parameters`, a top-level `rope_theta` and
    `original_max_position_embeddings` fill in what the dict lacks."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelLoadError(f"config.json: per-layer rope_parameters {params} are not supported")
    if params.get("rope_theta") is None:
        if hf.get("rope_theta") is None:
            logger.warning("config.json has no rope_theta: using %r, transformers' default",
                           default_theta)
        params["rope_theta"] = hf.get("rope_theta") or default_theta
    rope_type = params.pop("type", None)
    rope_type = params.setdefault("rope_type", rope_type or "default")
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"config.json: rope_type {rope_type!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor")) not in (None, 1, 1.0):
        raise ModelLoadError("config.json: partial_rotary_factor is not supported (the rotary "
                             "embedding covers the whole head)")
    if rope_type in ("llama3", "yarn"):
        if hf.get("original_max_position_embeddings") is not None:  # Phi-3 style: it wins
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    missing = [key for key in ROPE_TYPES[rope_type] if params.get(key) is None]
    if missing:
        raise ModelLoadError(f"config.json: {rope_type} rope scaling needs "
                             f"{', '.join(missing)} in rope_parameters (or rope_scaling)")
    return params
