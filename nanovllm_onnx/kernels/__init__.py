"""The engine's own ONNX Runtime CPU ops (SlotAttention, SwiGLU, SkipRMSNorm, BlockLinear:
`ops.cc`), built when the package is installed.

`pip install` (setup.py) compiles ops.cc once per target CPU (AMX-INT8, AVX-512 VNNI, AVX2
with and without AVX-VNNI, portable x86-64) and `dispatch.cc` into `ops.so`, the library
sessions load: it registers the build for this CPU, chosen by cpuid, or the one
NANO_VLLM_ONNX_KERNEL_TARGET names. No run calls a compiler or the network.
"""

from __future__ import annotations

import ctypes
import hashlib
from functools import cache
from pathlib import Path

DOMAIN = "nanovllm"
KEY_TILE = 16  # the key cache is [.., capacity / KEY_TILE, head_dim, KEY_TILE]: see the source
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the kernel is instantiated for
TARGET_ENV = "NANO_VLLM_ONNX_KERNEL_TARGET"
# The graph input (uint8 [tokens]) giving each token's role, by which the layers' BlockLinear
# choose its path on AMX (see ops.cc): a prompt token bf16; a generated one the int8 path, or
# either, whichever is faster for the call (bf16 in calls of a few dozen rows or with prompt
# tokens: the token's result then depends on what shares its step).
PROMPT_ROWS = "prompt_rows"
INT8_ROLE, PROMPT_ROLE, EITHER_ROLE = 0, 1, 2
LIBRARY = Path(__file__).with_name("ops.so")
SOURCES = ("dispatch.cc", "ops.cc")  # what setup.py hashes, in its order


class KernelBuildError(RuntimeError):
    """The engine's ops library is missing or older than its sources."""


def custom_ops_library() -> Path:
    """The library of the engine's ops to register with a session (it dispatches by CPU)."""
    rebuild = ("reinstall the package (pip install .), or in a source checkout run "
               "`pip install -e .` or `python setup.py build_ext --inplace`; it needs g++")
    if not LIBRARY.is_file():
        raise KernelBuildError(f"the engine's CPU kernels were not built ({LIBRARY} is "
                               f"missing): {rebuild}")
    if _source_hash(LIBRARY.parent) not in (None, _built_from(LIBRARY)):
        raise KernelBuildError(f"the engine's CPU kernels ({LIBRARY}) were built from other "
                               f"sources than {LIBRARY.parent}/*.cc: {rebuild}")
    return LIBRARY


def kernel_target() -> str:
    """The build of the ops that sessions of this process get: avx512_amx, avx512_vnni,
    avx2_vnni, avx2 or portable (forced by NANO_VLLM_ONNX_KERNEL_TARGET, else the best this CPU
    runs)."""
    target = _library(custom_ops_library()).NanovllmKernelTarget().decode()
    if target.startswith("error: "):
        raise KernelBuildError(target.removeprefix("error: "))
    return target


@cache
def target_library(target: str) -> ctypes.CDLL:
    """The `target` build of ops.cc itself, for the functions it exports beside the ops
    (quantization, sampling: through ctypes, which releases the GIL while they run)."""
    return ctypes.CDLL(str(custom_ops_library().with_name(f"ops_{target}.so")))


def supported_targets() -> list[str]:
    """The builds this CPU can run, best first (cpuid, as the dispatcher sees it)."""
    return _library(custom_ops_library()).NanovllmKernelTargets().decode().split(",")


@cache
def _library(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name in ("NanovllmKernelTarget", "NanovllmKernelTargets", "NanovllmKernelSource"):
        getattr(library, name).restype = ctypes.c_char_p
    return library


def _built_from(library: Path) -> str:
    return _library(library).NanovllmKernelSource().decode()


def _source_hash(directory: Path) -> str | None:
    """The sources' hash as setup.py takes it (None where they are not: an installed wheel)."""
    sources = [directory / name for name in SOURCES]
    if not all(source.is_file() for source in sources):
        return None
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()
