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
from ml_dtypes import bfloat16

T = TypeVar("T")


class ModelLoadError(ValueError):
    """A model folder or file that cannot be used, with what is wrong in it."""


class MissingWeightError(ModelLoadError, KeyError):
    """A weight the model needs that its file lacks; a KeyError too, so that `in` and `.get`
    on the tensors work as on a dict."""

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0])


class LazyMapping(Mapping[str, T]):
    """Values read only when asked for."""

    def __init__(self, loaders: dict[str, Callable[[], T]]) -> None:
        self._loaders = loaders

    def __getitem__(self, name: str) -> T:
        loader = self._loaders.get(name)
        if loader is None:
            raise MissingWeightError(f"the model file has no weight {name}")
        return loader()

    def __contains__(self, name: object) -> bool:  # Mapping's would read the value
        return name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


@dataclass
class Rows:
    """A 2-D weight [rows, columns] read by ranges of rows as float32: a large one (the
    embedding, an LM head) is converted a slice at a time, never whole in memory."""

    shape: tuple[int, int]
    read: Callable[[int, int], np.ndarray]  # rows [lo, hi)
    # rows [lo, hi) as stored where that is bfloat16 (for the quantizer, which reads it)
    read_stored: Callable[[int, int], np.ndarray] | None = None

    def chunks(self, rows: int, stored: bool = False) -> Iterator[np.ndarray]:
        """Slices of `rows` rows: float32, or as stored (bfloat16) where `stored` and it is."""
        read = self.read_stored if stored and self.read_stored else self.read
        for lo in range(0, self.shape[0], rows):
            yield read(lo, min(lo + rows, self.shape[0]))

    @staticmethod
    def of(array: np.ndarray) -> Rows:
        return Rows(array.shape, lambda lo, hi: array[lo:hi])


class LazyTensors(LazyMapping[np.ndarray]):
    """HF-named weights, each read (and dequantized) only when asked for, as float32; those
    in `rows` can also be read a range of rows at a time, and as stored where that is bfloat16
    (`stored`)."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]],
                 rows: dict[str, Rows] | None = None) -> None:
        super().__init__(loaders)
        self._rows = rows or {}

    def stored(self, name: str) -> np.ndarray:
        """`name` as stored where that is bfloat16 (ml_dtypes), else as float32."""
        tensor = self._rows.get(name)
        if tensor is not None and tensor.read_stored is not None:
            return tensor.read_stored(0, tensor.shape[0])
        return self[name]

    def __getitem__(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(super().__getitem__(name), dtype=np.float32)

    def rows(self, name: str) -> Rows:
        """`name` by ranges of rows (read whole first where its source cannot read part)."""
        return self._rows[name] if name in self._rows else Rows.of(self[name])


@dataclass
class QuantBlocks:
    """Weights in blocks of 32 (or 128) along the input dimension, w = q * scale + minimum, as
    BlockLinear runs them (scale and minimum are stored as fp16 there). A GGUF's own blocks
    come in as they are: no second rounding."""

    q: np.ndarray  # uint8 [out_features, blocks, block], below 2**bits
    scale: np.ndarray  # float32 [out_features, blocks]
    minimum: np.ndarray  # float32 [out_features, blocks]
    bits: int  # 4 or 8

    @staticmethod
    def concat(parts: list[QuantBlocks]) -> QuantBlocks:
        """Stacked by rows; 4-bit parts beside 8-bit ones are 8-bit blocks (same values)."""
        return QuantBlocks(*(np.concatenate([getattr(p, f) for p in parts])
                             for f in ("q", "scale", "minimum")), max(p.bits for p in parts))

    def dequantize(self) -> np.ndarray:
        """The float32 [out_features, blocks * block] weights, as BlockLinear sees them."""
        scale, minimum = (a.astype(np.float16).astype(np.float32)[..., None]
                          for a in (self.scale, self.minimum))
        return (self.q * scale + minimum).reshape(len(self.q), -1)


@dataclass
class BlockRows:
    """A quantized 2-D weight's blocks by ranges of rows: a GGUF's vocabulary tables, packed a
    slice at a time (a Llama-3.1-8B's Q6_K LM head whole took 4 GB to convert)."""

    shape: tuple[int, int]
    bits: int
    read: Callable[[int, int], QuantBlocks]  # rows [lo, hi)


@dataclass
class ModelSource:
    config: dict  # HF config.json
    tensors: Mapping[str, np.ndarray]  # HF names, e.g. model.layers.0.self_attn.q_proj.weight
    tokenizer_json: str  # the tokenizers library's JSON
    tokenizer_config: dict = field(default_factory=dict)  # chat_template, bos/eos, add_bos_token
    generation_config: dict = field(default_factory=dict)
    # A GGUF's quantized weights as BlockLinear blocks, by HF name, read when asked for.
    quant_blocks: Mapping[str, QuantBlocks] = field(default_factory=dict)
    block_rows: Mapping[str, BlockRows] = field(default_factory=dict)  # the large ones of them

    def rows(self, name: str) -> Rows:
        """A 2-D weight by ranges of rows (see Rows)."""
        if isinstance(self.tensors, LazyTensors):
            return self.tensors.rows(name)
        return Rows.of(np.asarray(self.tensors[name], np.float32))

    def matrix(self, name: str) -> np.ndarray:
        """A weight float32, or bfloat16 where the checkpoint stores it so: for those that
        the kernels library quantizes (it reads bf16; no float32 copy is made)."""
        if isinstance(self.tensors, LazyTensors):
            return self.tensors.stored(name)
        return np.asarray(self.tensors[name], np.float32)


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
    index = folder / "model.safetensors.index.json"  # a sharded checkpoint's list of shards
    if index.is_file():
        listed = set(_read_json(index).get("weight_map", {}).values())
        if missing := sorted(name for name in listed if not (folder / name).is_file()):
            raise ModelLoadError(f"{folder} lacks {', '.join(missing)}, listed in "
                                 f"{index.name}: an interrupted download?")
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    rows: dict[str, Rows] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ModelLoadError(f"cannot read {file}: {e}") from e
        data_start, header = _safetensors_header(file)
        for name in names:
            tensor = _safetensors_rows(file, data_start, header[name])
            if tensor is None:
                loaders[name] = _safetensors_loader(file, name)
            else:
                loaders[name] = _whole(tensor)
                if len(tensor.shape) == 2:
                    rows[name] = tensor
    return read_folder_source(folder, LazyTensors(loaders, rows))


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


# safetensors dtype -> how it is stored and read; bfloat16 (which numpy lacks) as uint16 bits
_FLOATS = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """Where a safetensors file's data starts, and its header (name -> dtype, shape, offsets)."""
    with file.open("rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        return 8 + header_len, json.loads(fh.read(header_len))


def _safetensors_rows(file: Path, data_start: int, info: dict) -> Rows | None:
    """A float tensor read by ranges of rows straight from the file (each range mapped while
    it is read: the pages count towards this process's memory only that long); None for
    other dtypes and scalars."""
    dtype = _FLOATS.get(info["dtype"])
    if dtype is None or not info["shape"]:
        return None
    shape = tuple(info["shape"])
    row_bytes = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    start = data_start + info["data_offsets"][0]

    def stored(lo: int, hi: int) -> np.ndarray:
        raw = _mapped(file, dtype, start + lo * row_bytes, (hi - lo, *shape[1:]))
        return raw.view(bfloat16) if dtype is np.uint16 else raw

    def read(lo: int, hi: int) -> np.ndarray:
        return stored(lo, hi).astype(np.float32)

    return Rows(shape, read, stored if dtype is np.uint16 else None)


def _mapped(file: Path, dtype: type, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """Part of a file memory-mapped, read-only: no copy into fresh (zeroed) pages as a read
    makes (a fifth of a 3B int4 conversion's CPU time); the map goes with the array."""
    return np.memmap(file, dtype, "r", offset, shape)


def _whole(tensor: Rows) -> Callable[[], np.ndarray]:
    return lambda: tensor.read(0, tensor.shape[0])


def _safetensors_loader(file: Path, name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(file), framework="numpy") as f:
            return f.get_tensor(name)

    return load
