"""Turn a model source (HF folder, GGUF file or Optimum export) into a folder the engine runs,
cached."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from nanovllm_onnx.config import (
    GRAPH_FILE,
    MODEL_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHT_FORMATS,
    ModelConfig,
)
from nanovllm_onnx.convert.graph import build_graph
from nanovllm_onnx.convert.hf_config import resolved, sliding_window
from nanovllm_onnx.convert.source import (
    ModelLoadError,
    ModelSource,
    load_hf_folder,
    read_folder_source,
)
from nanovllm_onnx.convert.weight_file import WeightFile
from nanovllm_onnx.kernels import HEAD_DIMS
from nanovllm_onnx.runner.optimum_runner import (
    ATTENTION_MASK,
    INPUT_IDS,
    KNOWN_INPUTS,
    KV,
    KV_DTYPES,
    LOGITS,
    PAST,
    PRESENT,
)

logger = logging.getLogger(__name__)

# bump when the emitted graph changes, to invalidate caches (17: checkpoints saved by
# transformers 5 had their rope_parameters ignored; 18: fp32 projections as Gemm, weights
# written as they are made; 19: GGUF blocks kept, auto weights, the embedding in blocks;
# 20: the model's sliding window recorded; 21: the layers' BlockLinear take prompt_rows;
# 22: int8 weights as uint8 with zero point 128, right on AVX2 without VNNI; 23: the block
# formats' down projection takes gate_up, SwiGLU fused into its BlockLinear; 24: their
# SlotAttention takes prompt_rows, prompt tokens' attention on AMX's bf16 tiles; 25: auto's
# 8-bit blocks of a float weight are of 128 inputs, from min to max; 26: the residual adds
# and norms are the engine's SkipRMSNorm)
CONVERTER_VERSION = "26"
OPTIMUM_GRAPHS = ("model.onnx", "decoder_model_merged.onnx")
PARTIAL = ".partial"  # suffix of a conversion's folder while it is written
EXPORT_COMMAND = "optimum-cli export onnx --model M --task text-generation-with-past OUT"


def load_source(path: Path) -> ModelSource:
    """A GGUF file or HF folder, its config completed and checked (hf_config.resolved)."""
    if path.is_file() and path.suffix == ".gguf":
        from nanovllm_onnx.convert.gguf_source import load_gguf

        src = load_gguf(path)
    elif path.is_dir():
        src = load_hf_folder(path)
    elif not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    else:
        raise ModelLoadError(f"{path} is neither a GGUF file, a Hugging Face checkpoint folder "
                             "nor a converted folder")
    src.config = resolved(src.config)
    return src


def model_config_from_source(src: ModelSource) -> ModelConfig:
    """The engine's config of a source from load_source."""
    hf = src.config
    # The graph adds biases to q, k and v only: others would be dropped without a word.
    dropped = [name for name in src.tensors
               if name.endswith(".bias") and not name.endswith(("q_proj.bias", "k_proj.bias",
                                                                  "v_proj.bias"))]
    if dropped:
        raise ModelLoadError(f"biases other than q/k/v_proj's are not supported: {dropped[0]}")
    return ModelConfig(
        architecture=hf["architectures"][0],
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        sliding_window=hf["sliding_window"],
        **tokenizer_fields(src),
    )


def tokenizer_fields(src: ModelSource) -> dict[str, Any]:
    """ModelConfig's special tokens and chat template: read alike from every kind of source."""
    hf = src.config
    eos: list[int] = []
    for value in (src.generation_config.get("eos_token_id"), hf.get("eos_token_id")):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in eos:
                eos.append(int(token))
    tc = src.tokenizer_config
    return dict(
        eos_token_ids=eos,
        bos_token_id=hf.get("bos_token_id", src.generation_config.get("bos_token_id")),
        add_bos_token=bool(tc.get("add_bos_token", False)),
        chat_template=tc.get("chat_template"),
        bos_token=_token_text(tc.get("bos_token")),
        eos_token=_token_text(tc.get("eos_token")),
    )


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def optimum_graph(path: Path) -> Path | None:
    """The graph of an Optimum export folder (ONNX files, no safetensors); None for others."""
    if not path.is_dir() or any(path.glob("*.safetensors")) or not any(path.glob("*.onnx")):
        return None
    for name in OPTIMUM_GRAPHS:
        if (path / name).is_file():
            return path / name
    found = ", ".join(sorted(p.name for p in path.glob("*.onnx")))
    raise ModelLoadError(f"{path} has {found} but no {' or '.join(OPTIMUM_GRAPHS)}; export the "
                         f"decoder with its past: {EXPORT_COMMAND}")


def load_optimum_export(folder: Path, graph: Path) -> ModelSource:
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise ModelLoadError(
                f"{folder} has {graph.name} but no {name}, which the engine reads beside it; "
                f"export the model again (Optimum writes both): {EXPORT_COMMAND}"
            )
    return read_folder_source(folder, {})


def optimum_model_config(src: ModelSource, graph: Path) -> ModelConfig:
    """The config of an Optimum export: K/V and logits shapes from the graph, the rest from
    config.json."""
    model = onnx.load(str(graph), load_external_data=False)
    inputs = {v.name: v.type.tensor_type for v in model.graph.input}
    outputs = {v.name: v.type.tensor_type for v in model.graph.output}
    num_layers = 0
    while PAST.format(num_layers, "key") in inputs:
        num_layers += 1
    past = [PAST.format(i, kind) for i in range(num_layers) for kind in KV]
    present = [PRESENT.format(i, kind) for i in range(num_layers) for kind in KV]
    missing = [n for n in (INPUT_IDS, ATTENTION_MASK, *past) if n not in inputs]
    missing += [n for n in (LOGITS, *present) if n not in outputs]
    unexpected = sorted(set(inputs) - set(KNOWN_INPUTS) - set(past))
    if not num_layers or missing or unexpected:
        raise ModelLoadError(
            f"{graph} is not a decoder with past this engine can run: it needs inputs "
            f"{INPUT_IDS}, {ATTENTION_MASK}, {PAST.format('N', 'key/value')} and outputs "
            f"{LOGITS}, {PRESENT.format('N', 'key/value')} (inputs: {', '.join(inputs)}; "
            f"outputs: {', '.join(outputs)}); export it with: {EXPORT_COMMAND}"
        )
    kv_type = inputs[past[0]]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in kv_type.shape.dim]
    kv_dtype = onnx.helper.tensor_dtype_to_np_dtype(kv_type.elem_type)
    if len(dims) != 4 or dims[1] is None or dims[3] is None or kv_dtype not in KV_DTYPES.values():
        raise ModelLoadError(f"{graph}: {past[0]} is {kv_dtype} {dims}; the engine reads float32 "
                             "or float16 past K/V laid out [batch, kv_heads, past, head_dim]")
    hf = src.config
    logits_dims = outputs[LOGITS].shape.dim
    vocab = (logits_dims[-1].dim_value if logits_dims else 0) or hf.get("vocab_size")
    if not vocab:
        raise ModelLoadError(f"{graph}: neither the logits output nor config.json gives the "
                             "vocabulary size")
    kv_heads, head_dim = dims[1], dims[3]
    max_pos = _first(hf, "max_position_embeddings", "n_positions")
    if not max_pos:
        raise ModelLoadError(f"{graph}: config.json gives no max_position_embeddings (or "
                             "n_positions): the longest sequence the model takes")
    heads = _first(hf, "num_attention_heads", "n_head") or kv_heads
    return ModelConfig(
        architecture=(hf.get("architectures") or [hf.get("model_type", "<unknown>")])[0],
        num_layers=num_layers,
        hidden_size=_first(hf, "hidden_size", "n_embd", "d_model") or heads * head_dim,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        sliding_window=sliding_window(hf),
        runner="optimum",
        graph_path=str(graph.resolve()),
        **tokenizer_fields(src),
    )


def _first(config: dict, *keys: str) -> Any:
    """The first of `keys` that config.json sets (architectures name the same size apart)."""
    return next((config[k] for k in keys if config.get(k)), None)


def convert(source_path: Path, out_dir: Path, weights: str = "auto") -> ModelConfig:
    """Convert a HF folder, GGUF file or Optimum export into `out_dir` (written atomically).
    `weights` (one of WEIGHT_FORMATS) is the format of the projection, MLP, embedding and LM
    head weights."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}; got {weights!r}")
    graph = optimum_graph(source_path)
    if graph is not None and weights not in ("auto", "fp32"):
        raise ModelLoadError(f"{source_path} is an Optimum export, which runs as exported: "
                             "quantize it when exporting, or convert the HF checkpoint instead")
    if graph is None:
        src = load_source(source_path)
        cfg = model_config_from_source(src)
        cfg.weights = weights
        if cfg.head_dim not in HEAD_DIMS:
            raise ModelLoadError(f"head_dim {cfg.head_dim} is not supported by the attention "
                                 f"kernel (supported: {', '.join(map(str, HEAD_DIMS))})")
    else:
        src = load_optimum_export(source_path, graph)
        cfg = optimum_model_config(src, graph)
    cfg.source, cfg.converter_version = str(source_path.resolve()), int(CONVERTER_VERSION)
    logger.info("converting %s (%s, %d layers) to %s", source_path, cfg.architecture,
                cfg.num_layers, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    # Written beside the target and renamed when complete: an interrupted run leaves a
    # `.partial` folder, never an entry taken for a converted model.
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.{os.getpid()}.", suffix=PARTIAL,
                                dir=out_dir.parent))
    try:
        # An Optimum export's graph is run as it is, from where it is.
        if graph is None:
            weight_file = WeightFile(tmp / (GRAPH_FILE + ".data"))
            try:
                model = build_graph(src, cfg, weight_file)
            finally:
                weight_file.close()
            onnx.save_model(model, str(tmp / GRAPH_FILE))
        (tmp / TOKENIZER_FILE).write_text(src.tokenizer_json, encoding="utf-8")
        cfg.save(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg


def _remove_stale_partials(out_dir: Path) -> None:
    """The partial folders of conversions to `out_dir` whose process is gone (killed)."""
    for partial in out_dir.parent.glob(f"{glob.escape(out_dir.name)}.*{PARTIAL}"):
        pid = partial.name[len(out_dir.name) + 1:].split(".")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            logger.info("removing %s, left by an interrupted conversion", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def is_converted(folder: Path) -> bool:
    if not (folder / MODEL_CONFIG_FILE).is_file():
        return False
    return ModelConfig.load(folder).graph_file(folder).is_file()


def resolve_model(model: str | None, weights: str | None = None) -> Path:
    """The converted folder for `model`, converting (once, cached) when needed. `weights`
    picks the format to convert to (default auto; for the default model fp32: its answer to
    the README's question is a near-tie that any 8-bit activation rounding flips, see
    README); a converted folder runs as it is."""
    from nanovllm_onnx.default_model import cache_dir, default_model_path

    path = default_model_path() if model is None else Path(model).expanduser()
    if path.is_dir() and is_converted(path):
        if ModelConfig.load(path).runner == "gqa":
            raise ModelLoadError(f"{path} was converted by an older nano-vllm-onnx (its graph "
                                 "uses GroupQueryAttention): convert the source again")
        have = ModelConfig.load(path).weights
        if weights not in (None, have):
            raise ValueError(f"{path} is already converted with {have} weights; convert the "
                             f"source again with --weights {weights}")
        return path
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    weights = weights or ("fp32" if model is None else "auto")
    out = cache_dir() / "converted" / f"{path.name}-{weights}-{_source_key(path)}"
    if not is_converted(out):
        convert(path, out, weights)
        _remove_replaced(out)
    return out


def _remove_replaced(out: Path) -> None:
    """The cache's earlier conversions of out's source to out's weights (by an older converter,
    or of the source's earlier files), each GBs at 1-8B parameters. A newer converter's entry
    stays (another install's); a process running a removed one keeps its open files."""
    new = ModelConfig.load(out)
    stem = out.name[:out.name.rindex("-") + 1]  # {source name}-{weights}-
    for entry in out.parent.glob(glob.escape(stem) + "*"):
        if entry == out or entry.name.endswith(PARTIAL):
            continue
        try:
            old = ModelConfig.load(entry)
        except (OSError, ValueError, TypeError):  # not an entry this version can read
            continue
        if (old.source, old.weights) == (new.source, new.weights) and \
                (old.converter_version or 0) <= int(CONVERTER_VERSION):
            logger.info("removing %s, which %s replaces", entry, out.name)
            shutil.rmtree(entry, ignore_errors=True)


def _source_key(path: Path) -> str:
    """Changes when the source's files or the converter change."""
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
