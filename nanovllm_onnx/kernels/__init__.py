"""The engine's own ONNX Runtime CPU ops (SlotAttention, SwiGLU, BlockLinear: `ops.cc`), compiled
on first use.

The C++ source ships with the package; the first session on a machine builds it with the
system's g++ for that CPU (-march=native) into the cache, keyed by source, flags, CPU and
onnxruntime version, so later starts load it at once. ONNX Runtime's C/C++ API headers come
from Debian's libonnxruntime-dev package (checked against its SHA-256), or from the directory
that NANO_VLLM_ONNX_ORT_INCLUDE names (for machines without network access).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import onnxruntime as ort

from nanovllm_onnx.default_model import cache_dir

SOURCE = Path(__file__).with_name("ops.cc")
DOMAIN = "nanovllm"
KEY_TILE = 16  # the key cache is [.., capacity / KEY_TILE, head_dim, KEY_TILE]: see the source
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the kernel is instantiated for
# Compiled with -ffast-math (glibc's vector expf: softmax, SiLU) but linked without it: a
# library linked with it carries crtfastmath.o, which turns on flush-to-zero in whatever
# process loads it (numpy's subnormals included).
FLAGS = ["-O3", "-ffast-math", "-fPIC", "-std=c++17", "-fvisibility=hidden"]
# The headers' API version (21) is older than any onnxruntime this package allows, which is
# what ONNX Runtime's C API keeps compatible.
HEADERS_DEB = ("https://deb.debian.org/debian/pool/main/o/onnxruntime/"
               "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb")
HEADERS_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
HEADERS_IN_DEB = "./usr/include/onnxruntime/"


class KernelBuildError(RuntimeError):
    """The engine's ops could not be built (no compiler, no headers)."""


def custom_ops_library(arch: str = "-march=native") -> Path:
    """The compiled library of the engine's ops for this machine (built once, then cached).
    `arch`: the target flags (tests build the AVX2 and portable paths with others)."""
    flags = [*FLAGS, *arch.split()]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), ort.__version__.encode(),
                 " ".join(sorted(cpu_flags())).encode()):
        key.update(part)
    library = cache_dir() / "kernels" / f"nanovllm-ops-{key.hexdigest()[:16]}.so"
    if not library.is_file():
        _compile(library, flags)
    return library


def _compile(library: Path, flags: list[str]) -> None:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(
            f"nano-vllm-onnx builds its CPU kernels with a C++ compiler on first use and "
            f"found no {compiler!r}: install g++ (Debian/Ubuntu: apt install g++) or set CXX")
    library.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(suffix=".so", dir=library.parent)[1])
    obj = tmp.with_suffix(".o")
    for cmd in ([compiler, *flags, "-I", str(_ort_headers()), "-c", str(SOURCE), "-o", str(obj)],
                [compiler, "-shared", str(obj), "-o", str(tmp)]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            tmp.unlink(missing_ok=True)
            obj.unlink(missing_ok=True)
            raise KernelBuildError(f"building the engine's CPU kernels failed "
                                   f"({' '.join(cmd)}):\n{result.stderr[-4000:]}")
    obj.unlink()
    os.replace(tmp, library)  # atomic: concurrent first starts each build and one wins


def _ort_headers() -> Path:
    if env := os.environ.get("NANO_VLLM_ONNX_ORT_INCLUDE"):
        return Path(env)
    include = cache_dir() / "kernels" / "onnxruntime-1.21-include"
    if (include / "onnxruntime_cxx_api.h").is_file():
        return include
    try:
        with urllib.request.urlopen(HEADERS_DEB, timeout=60) as response:
            deb = response.read()
    except OSError as e:
        raise KernelBuildError(
            f"could not fetch ONNX Runtime's C++ API headers from {HEADERS_DEB} ({e}); put "
            "them (onnxruntime_cxx_api.h and what it includes) in a directory and set "
            "NANO_VLLM_ONNX_ORT_INCLUDE to it") from e
    if hashlib.sha256(deb).hexdigest() != HEADERS_SHA256:
        raise KernelBuildError(f"{HEADERS_DEB} does not have the expected SHA-256")
    tmp = Path(tempfile.mkdtemp(dir=include.parent))
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(_ar_member(deb, "data.tar.xz")))) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(HEADERS_IN_DEB):
                target = tmp / member.name[len(HEADERS_IN_DEB):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    try:
        os.replace(tmp, include)
    except OSError:  # another process put them there first: keep theirs (it may be compiling)
        shutil.rmtree(tmp, ignore_errors=True)
    return include


def _ar_member(archive: bytes, name: str) -> bytes:
    """One member of an `ar` archive (a .deb is one): 8-byte magic, then 60-byte headers."""
    pos = 8
    while pos + 60 <= len(archive):
        header = archive[pos:pos + 60]
        size = int(header[48:58])
        if header[:16].decode().strip().rstrip("/") == name:
            return archive[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2
    raise KernelBuildError(f"{HEADERS_DEB} has no {name}")


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo): -march=native depends on them, so
    they are part of the cache key."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())
