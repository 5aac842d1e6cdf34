"""`pip wheel .` gives a wheel whose kernels are built in: it installs into a fresh venv and
generates on a PATH without a compiler, as the in-tree package does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.default_model import default_model_path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
GENERATE = f"""
import json
from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.kernels import custom_ops_library, kernel_target
out = LLM().generate([{PROMPT!r}], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
print(json.dumps({{"library": str(custom_ops_library()), "target": kernel_target(),
                  "tokens": out[0].outputs[0].token_ids}}))
"""


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def test_wheel_installs_and_generates_without_a_compiler(tmp_path: Path) -> None:
    try:
        default_model_path()
    except RuntimeError as e:
        pytest.skip(f"default model unavailable: {e}")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(ROOT)])
    (wheel,) = (tmp_path / "dist").glob("nano_vllm_onnx-*.whl")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CXX", "CC")}
    run([sys.executable, "-m", "venv", str(venv)], env=env)
    run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         str(wheel)], env=env, cwd=tmp_path)
    # The dependencies (onnxruntime, ...) from this environment, after the venv's own packages:
    # a path a .pth file adds has its own .pth files (an editable install's) ignored.
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env["PATH"] = str(venv / "bin")  # no g++, no cc
    result = run([str(venv / "bin/python"), "-c", GENERATE], env=env, cwd=tmp_path)
    wheel_run = json.loads(result.stdout.strip().splitlines()[-1])

    assert Path(wheel_run["library"]).is_relative_to(site)
    expected = LLM().generate([PROMPT], SamplingParams(temperature=0, max_tokens=12),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert wheel_run["tokens"] == expected
    from nanovllm_onnx.kernels import kernel_target

    assert wheel_run["target"] == kernel_target()
