"""Turn a model source (HF folder or GGUF file) into a folder the engine runs, cached."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

import onnx

from nanovllm_onnx.config import GRAPH_FILE, MODEL_CONFIG_FILE, TOKENIZER_FILE, ModelConfig
from nanovllm_onnx.convert.graph import build_graph
from nanovllm_onnx.convert.source import ModelLoadError, ModelSource, load_hf_folder

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
CONVERTER_VERSION = "1"  # bump when the emitted graph changes, to invalidate caches


def load_source(path: Path) -> ModelSource:
    if path.is_file() and path.suffix == ".gguf":
        from nanovllm_onnx.convert.gguf_source import load_gguf

        return load_gguf(path)
    if path.is_dir():
        return load_hf_folder(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    raise ModelLoadError(
        f"{path} is neither a GGUF file, a Hugging Face checkpoint folder nor a converted folder"
    )


def model_config_from_source(src: ModelSource) -> ModelConfig:
    hf = src.config
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    heads = hf["num_attention_heads"]
    eos: list[int] = []
    for value in (src.generation_config.get("eos_token_id"), hf.get("eos_token_id")):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in eos:
                eos.append(int(token))
    tc = src.tokenizer_config
    return ModelConfig(
        architecture=arch,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        eos_token_ids=eos,
        bos_token_id=hf.get("bos_token_id", src.generation_config.get("bos_token_id")),
        add_bos_token=bool(tc.get("add_bos_token", False)),
        chat_template=tc.get("chat_template"),
        bos_token=_token_text(tc.get("bos_token")),
        eos_token=_token_text(tc.get("eos_token")),
    )


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def convert(source_path: Path, out_dir: Path) -> ModelConfig:
    """Convert a HF folder or GGUF file into `out_dir` (written atomically)."""
    src = load_source(source_path)
    cfg = model_config_from_source(src)
    if cfg.head_dim % 16:
        raise ModelLoadError(f"head_dim {cfg.head_dim} is not a multiple of 16, which "
                             "ONNX Runtime's GroupQueryAttention rotary needs")
    logger.info("converting %s (%s, %d layers) to %s", source_path, cfg.architecture,
                cfg.num_layers, out_dir)
    model = build_graph(src, cfg, src.config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        onnx.save_model(model, str(tmp / GRAPH_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=GRAPH_FILE + ".data",
                        size_threshold=1024)
        (tmp / TOKENIZER_FILE).write_text(src.tokenizer_json, encoding="utf-8")
        cfg.save(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def is_converted(folder: Path) -> bool:
    return (folder / MODEL_CONFIG_FILE).is_file() and (folder / GRAPH_FILE).is_file()


def resolve_model(model: str | None) -> Path:
    """The converted folder for `model`, converting (once, cached) when needed."""
    from nanovllm_onnx.default_model import cache_dir, default_model_path

    path = default_model_path() if model is None else Path(model).expanduser()
    if path.is_dir() and is_converted(path):
        return path
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    out = cache_dir() / "converted" / f"{path.name}-{_source_key(path)}"
    if not is_converted(out):
        convert(path, out)
    return out


def _source_key(path: Path) -> str:
    """Changes when the source's files or the converter change."""
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
