"""A Llama-3.2-shaped HF checkpoint with random bf16 weights from a fixed seed, written one
tensor at a time (bounded memory, whatever the size), with the default model's tokenizer.

Speed and memory do not need trained weights. The same seed gives the same bytes.

    python benchmarks/random_checkpoint.py 1b /work/data/llama-1b
    python benchmarks/random_checkpoint.py 3b /work/data/llama-3b
    python benchmarks/random_checkpoint.py 8b /work/data/llama-8b   # Llama-3.1-8B's shape

Above 5 GB the weights are sharded as transformers saves them (model-0000K-of-0000N.safetensors
and model.safetensors.index.json), as the checkpoints people download are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


SHAPES = {  # Llama-3.2's and Llama-3.1-8B's configs, vocabulary and rope included
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               rope_scaling=llama3_rope(32.0), tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128,
               rope_scaling=llama3_rope(32.0), tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               rope_scaling=llama3_rope(8.0), tie_word_embeddings=False),
}
INIT_STD = 0.02  # transformers' initializer_range
CHUNK = 1 << 24  # values generated at a time
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size


def config(size: str) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                torch_dtype="bfloat16", hidden_act="silu", attention_bias=False,
                mlp_bias=False, **SHAPES[size])


def tensor_shapes(cfg: dict) -> dict[str, list[int]]:
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": [cfg["vocab_size"], h]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": [h],
                   f"{p}.self_attn.q_proj.weight": [q, h],
                   f"{p}.self_attn.k_proj.weight": [kv, h],
                   f"{p}.self_attn.v_proj.weight": [kv, h],
                   f"{p}.self_attn.o_proj.weight": [h, q],
                   f"{p}.post_attention_layernorm.weight": [h],
                   f"{p}.mlp.gate_proj.weight": [inter, h],
                   f"{p}.mlp.up_proj.weight": [inter, h],
                   f"{p}.mlp.down_proj.weight": [h, inter]}
    shapes["model.norm.weight"] = [h]
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = [cfg["vocab_size"], h]
    return shapes


def bf16_bytes(shape: list[int]) -> int:
    return 2 * int(np.prod(shape))


def bf16_chunks(rng: np.random.Generator, name: str, count: int):
    """Normal(0, INIT_STD) values, norms around 1, as bf16 bits (the top half of float32)."""
    for start in range(0, count, CHUNK):
        x = rng.standard_normal(min(CHUNK, count - start), dtype=np.float32) * INIT_STD
        if name.endswith("norm.weight"):
            x += 1
        yield (x.view(np.uint32) >> 16).astype(np.uint16)


def write_safetensors(path: Path, shapes: dict[str, list[int]],
                      rng: np.random.Generator) -> None:
    """safetensors' layout (8-byte header size, JSON header, data), streamed: its Python API
    takes every tensor at once, and numpy has no bfloat16."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = bf16_bytes(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            for chunk in bf16_chunks(rng, name, int(np.prod(shape))):
                chunk.tofile(f)


def write_tokenizer(folder: Path) -> None:
    """The default model's tokenizer (SmolLM2's, from its GGUF)."""
    from nanovllm_onnx.convert.gguf_source import load_gguf
    from nanovllm_onnx.default_model import default_model_path

    src = load_gguf(default_model_path())
    (folder / "tokenizer.json").write_text(src.tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(src.tokenizer_config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(src.generation_config, indent=2))


def make_checkpoint(size: str, out: Path, seed: int = 0) -> Path:
    """Llama-3.2-`size`'s shape with the default model's tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    gen = json.loads((out / "generation_config.json").read_text())
    return write_checkpoint(out, config(size) | {"bos_token_id": gen.get("bos_token_id"),
                                                 "eos_token_id": gen.get("eos_token_id")}, seed)


def write_checkpoint(out: Path, cfg: dict, seed: int = 0) -> Path:
    """The weights of a llama config `cfg` and its config.json (last: it marks the folder as a
    checkpoint) into `out`, which holds its tokenizer already."""
    shapes = tensor_shapes(cfg)
    shards: list[dict[str, list[int]]] = [{}]
    shard_bytes = 0
    for name, shape in shapes.items():  # in order, a new shard when this one would pass 5 GB
        size = bf16_bytes(shape)
        if shards[-1] and shard_bytes + size > SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = shape
        shard_bytes += size
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    rng = np.random.default_rng(seed)  # one stream over every shard: the same bytes unsharded
    for file, shard in zip(files, shards):
        write_safetensors(out / file, shard, rng)
    if len(shards) > 1:
        total = sum(map(bf16_bytes, shapes.values()))
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.out / "config.json").is_file():
        sys.exit(f"{args.out} holds a checkpoint already")
    make_checkpoint(args.size, args.out, args.seed)


if __name__ == "__main__":
    main()
