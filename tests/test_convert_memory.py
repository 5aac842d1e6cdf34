"""Conversion in bounded memory, and atomic: a model bigger than the memory budget converts
under it, and a killed conversion leaves nothing a later run takes as converted; a new
conversion of a source replaces the cache's earlier ones. Served, int4's weights stay in the
file's pages rather than copied."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks.random_checkpoint import config, write_checkpoint
from nanovllm_onnx.config import GRAPH_FILE, ModelConfig
from nanovllm_onnx.convert.converter import PARTIAL, convert, is_converted, resolve_model
from nanovllm_onnx.convert.source import LazyTensors
from tests.conftest import write_tokenizer

# A Llama-3.2-shaped checkpoint, scaled down: 62M parameters, 124 MB of bf16, 250 MB of fp32.
SHAPE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
             num_attention_heads=12, num_key_value_heads=4, head_dim=64, vocab_size=32000,
             max_position_embeddings=2048, bos_token_id=1, eos_token_id=4)
FP32_BYTES = 4 * 62_000_000
# What converting may add to the memory the converter's imports take: half the fp32 model.
# (Converting it whole, as before, took more than twice the model.)
BUDGET = FP32_BYTES // 2

PEAK = """
import resource, sys
from pathlib import Path
from nanovllm_onnx.convert.converter import convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert(Path(sys.argv[1]), Path(sys.argv[2]), "fp32")
print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


# The private (anonymous) memory that serving the model a few tokens adds, from smaps_rollup.
SERVE = """
import sys
from pathlib import Path
from nanovllm_onnx import LLM, SamplingParams
def anonymous():
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Anonymous:"))
before = anonymous()
llm = LLM(sys.argv[1], kv_cache_memory_gib=0.05, max_model_len=256)
llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))
print(anonymous() - before)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mid")
    write_tokenizer(folder)
    return write_checkpoint(folder, config("1b") | SHAPE)


def test_conversion_stays_under_memory_budget(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp32"
    done = subprocess.run([sys.executable, "-c", PEAK, str(checkpoint), str(out)],
                          capture_output=True, text=True, check=True)
    base, peak = map(int, done.stdout.split())
    written = (out / (GRAPH_FILE + ".data")).stat().st_size
    assert written > FP32_BYTES * 0.95  # the model really is bigger than the budget
    assert peak - base < BUDGET, f"conversion took {(peak - base) / 2**20:.0f} MiB"
    # The weights the graph points to are the checkpoint's: spot-check one.
    graph = onnx.load(str(out / GRAPH_FILE), load_external_data=False)
    emb = next(t for t in graph.graph.initializer if t.name == "model.embed_tokens.weight")
    where = {e.key: int(e.value) for e in emb.external_data if e.key != "location"}
    rows = np.fromfile(out / (GRAPH_FILE + ".data"), np.float32, count=2 * SHAPE["hidden_size"],
                       offset=where["offset"]).reshape(2, -1)
    from nanovllm_onnx.convert.source import load_hf_folder

    expected = load_hf_folder(checkpoint).tensors["model.embed_tokens.weight"][:2]
    np.testing.assert_array_equal(rows, expected)


def test_asking_for_a_weights_presence_reads_nothing() -> None:
    """The converter asks whether an LM head exists: that read a Llama-3.1-8B's whole head as
    float32 (2 GB) where Mapping's `in` fetched the value."""
    read: list[str] = []
    tensors = LazyTensors({"lm_head.weight": lambda: read.append("lm_head") or np.zeros(2)})
    assert "lm_head.weight" in tensors and "model.norm.weight" not in tensors
    assert tensors.get("model.norm.weight") is None and read == []


def test_served_blocks_are_the_files_pages(checkpoint: Path, tmp_path: Path) -> None:
    """int4's weights are read where they lie in the mapped file (shared with every process
    serving it), not copied. (fp32's matrices are one private copy, in ONNX Runtime's packed
    layout: its Gemm packs them again on every call of two or more rows otherwise.)"""
    out = tmp_path / "int4"
    convert(checkpoint, out, "int4")
    written = (out / (GRAPH_FILE + ".data")).stat().st_size
    served = subprocess.run([sys.executable, "-c", SERVE, str(out)], capture_output=True,
                            text=True, check=True)
    added = int(served.stdout.split()[-1])  # 4 MiB here; an fp32 model's packed copy: 230
    assert added < written / 2, f"serving added {added / 2**20:.0f} MiB of private memory"


def test_interrupted_conversion_is_not_taken_as_converted(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANO_VLLM_ONNX_CACHE", str(tmp_path))
    code = "import sys; from nanovllm_onnx.convert.converter import resolve_model; " \
           "resolve_model(sys.argv[1])"
    child = subprocess.Popen([sys.executable, "-c", code, str(checkpoint)],
                             env=os.environ | {"NANO_VLLM_ONNX_CACHE": str(tmp_path)},
                             stderr=subprocess.DEVNULL)
    converted = tmp_path / "converted"
    deadline = time.monotonic() + 120
    data = []  # kill it once it has written some weights
    while time.monotonic() < deadline and child.poll() is None:
        data = [f for f in converted.glob(f"*{PARTIAL}/{GRAPH_FILE}.data")
                if f.stat().st_size > 20 << 20]
        if data:
            break
        time.sleep(0.05)
    assert data and child.poll() is None, "the conversion ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not any(is_converted(entry) for entry in converted.iterdir())

    out = resolve_model(str(checkpoint))  # a later run converts it again, and clears up
    assert is_converted(out)
    assert [p.name for p in converted.iterdir()] == [out.name]


def test_a_new_conversion_replaces_the_earlier_ones_of_its_source(
        hf_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANO_VLLM_ONNX_CACHE", str(tmp_path / "cache"))
    source, namesake = tmp_path / "a" / "llama", tmp_path / "b" / "llama"
    shutil.copytree(hf_models["llama"], source)
    shutil.copytree(hf_models["llama"], namesake)  # another source of the same name
    first, other = resolve_model(str(source)), resolve_model(str(namesake))
    int8 = resolve_model(str(source), "int8")  # the same source in other weights
    assert len({first, other, int8}) == 3
    # A newer converter's entry of the same source (another install's): kept.
    newer = first.with_name(first.name[:-4] + "beef")
    shutil.copytree(first, newer)
    cfg = ModelConfig.load(newer)
    cfg.converter_version += 1
    cfg.save(newer)

    config_json = source / "config.json"
    os.utime(config_json, ns=(time.time_ns(), config_json.stat().st_mtime_ns + 10**9))
    second = resolve_model(str(source))  # the source's files changed: converted again
    assert second != first and is_converted(second)
    assert sorted(p.name for p in second.parent.iterdir()) == sorted(
        p.name for p in (second, other, int8, newer))
