"""A model source in Hugging Face terms, whatever it was read from.

Every loader (HF checkpoint folder, GGUF file) produces a `ModelSource`: the HF
config.json dict, the weights under their HF names as float32 numpy arrays, and
the tokenizer. The graph builder only ever sees this.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class ModelLoadError(ValueError):
    """A model folder or file that cannot be used, with what is wrong in it."""


class LazyMapping(Mapping[str, T]):
    """Values read only when asked for."""

    def __init__(self, loaders: dict[str, Callable[[], T]]) -> None:
        self._loaders = loaders

    def __getitem__(self, name: str) -> T:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


class LazyTensors(LazyMapping[np.ndarray]):
    """HF-named weights, each read (and dequantized) only when asked for, as float32."""

    def __getitem__(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._loaders[name](), dtype=np.float32)


@dataclass
class QuantBlocks:
    """Weights in blocks of 32 along the input dimension, w = q * scale + minimum, as
    BlockLinear runs them (scale and minimum are stored as fp16 there). A GGUF's own blocks
    come in as they are: no second rounding."""

    q: np.ndarray  # uint8 [out_features, blocks, 32], below 2**bits
    scale: np.ndarray  # float32 [out_features, blocks]
    minimum: np.ndarray  # float32 [out_features, blocks]
    bits: int  # 4 or 8

    @staticmethod
    def concat(parts: list[QuantBlocks]) -> QuantBlocks:
        """Stacked by rows; 4-bit parts beside 8-bit ones are 8-bit blocks (same values)."""
        return QuantBlocks(*(np.concatenate([getattr(p, f) for p in parts])
                             for f in ("q", "scale", "minimum")), max(p.bits for p in parts))

    def dequantize(self) -> np.ndarray:
        """The float32 [out_features, blocks * 32] weights, as BlockLinear sees them."""
        scale, minimum = (a.astype(np.float16).astype(np.float32)[..., None]
                          for a in (self.scale, self.minimum))
        return (self.q * scale + minimum).reshape(len(self.q), -1)


@dataclass
class ModelSource:
    config: dict  # HF config.json
    tensors: Mapping[str, np.ndarray]  # HF names, e.g. model.layers.0.self_attn.q_proj.weight
    tokenizer_json: str  # the tokenizers library's JSON
    tokenizer_config: dict = field(default_factory=dict)  # chat_template, bos/eos, add_bos_token
    generation_config: dict = field(default_factory=dict)
    # A GGUF's quantized weights as BlockLinear blocks, by HF name, read when asked for.
    quant_blocks: Mapping[str, QuantBlocks] = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def load_hf_folder(folder: Path) -> ModelSource:
    """Read a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)."""
    from safetensors import safe_open

    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise ModelLoadError(f"{folder} has no {name}: not a Hugging Face checkpoint folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights (PyTorch .bin checkpoints are not read: "
            "re-save with save_pretrained(..., safe_serialization=True))"
        )
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ModelLoadError(f"cannot read {file}: {e}") from e
        for name in names:
            loaders[name] = _safetensors_loader(file, name)
    return read_folder_source(folder, LazyTensors(loaders))


def read_folder_source(folder: Path, tensors: Mapping[str, np.ndarray]) -> ModelSource:
    """The JSON files and tokenizer of a folder laid out as Hugging Face saves (checked present)."""
    optional = {
        name: _read_json(folder / name) if (folder / name).is_file() else {}
        for name in ("tokenizer_config.json", "generation_config.json")
    }
    template_file = folder / "chat_template.jinja"  # newer transformers save the template apart
    if template_file.is_file():
        optional["tokenizer_config.json"]["chat_template"] = template_file.read_text("utf-8")
    return ModelSource(
        config=_read_json(folder / "config.json"),
        tensors=tensors,
        tokenizer_json=(folder / "tokenizer.json").read_text(encoding="utf-8"),
        tokenizer_config=optional["tokenizer_config.json"],
        generation_config=optional["generation_config.json"],
    )


def _safetensors_loader(file: Path, name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(file), framework="numpy") as f:
            if f.get_slice(name).get_dtype() == "BF16":  # numpy has no bfloat16
                return _read_bf16(file, name)
            return f.get_tensor(name)

    return load


def _read_bf16(file: Path, name: str) -> np.ndarray:
    """A bfloat16 tensor as float32: bf16 is the top half of a float32's bits."""
    with file.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(header_len))[name]
    start, end = info["data_offsets"]
    raw = np.fromfile(file, np.uint16, count=(end - start) // 2, offset=8 + header_len + start)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
