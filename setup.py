"""Builds the engine's ONNX Runtime CPU ops at install time (metadata: pyproject.toml).

`ops.cc` is compiled once per target CPU (its -march flags below) into ops_<target>.so, and
`dispatch.cc` into ops.so, the library ONNX Runtime loads: it picks the target by cpuid. A
wheel thus runs on any x86-64 machine, and no run needs a compiler or the network.
"""

import copy
import hashlib
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "nanovllm_onnx/kernels"
TARGETS = {  # the names dispatch.cc chooses among, best first
    "avx512_amx": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-int8",
                   "-mamx-bf16", "-mavx512vbmi"],
    "avx512_vnni": ["-march=x86-64-v4", "-mavx512vnni"],
    "avx2_vnni": ["-march=x86-64-v3", "-mavxvnni"],
    "avx2": ["-march=x86-64-v3"],
    # No FMA: attention's chains of multiply-adds kept in order (see fmadd in ops.cc).
    "portable": ["-march=x86-64", "-fno-associative-math", "-ffp-contract=off"],
}
# -ffast-math (glibc's vector expf: softmax, SiLU) only when compiling: a library linked with
# it carries crtfastmath.o, which turns on flush-to-zero in whatever process loads it.
FLAGS = ["-O3", "-ffast-math", "-std=c++17", "-fvisibility=hidden", "-g0", "-Wno-psabi"]


def headers() -> str:
    """ONNX Runtime's C/C++ API headers: the copy in third_party/ (see its README)."""
    include = os.environ.get("NANO_VLLM_ONNX_ORT_INCLUDE") or "third_party/onnxruntime/include"
    if not Path(include, "onnxruntime_cxx_api.h").is_file():
        raise SystemExit(
            f"nano-vllm-onnx: ONNX Runtime's C++ API headers are not in {include!r} "
            "(onnxruntime_cxx_api.h and what it includes): restore third_party/onnxruntime "
            "from the repository or set NANO_VLLM_ONNX_ORT_INCLUDE to a directory holding them")
    return include


class BuildLibraries(build_ext):
    """Plain shared libraries (ops_avx2.so, ...), not Python modules: ONNX Runtime loads them."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = 2

    def build_extensions(self) -> None:
        include = headers()
        for ext in self.extensions:
            ext.include_dirs.append(include)
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        # Every target compiles ops.cc, two at a time: each into its own object directory (in
        # the shared one, a build could link the object another target's compiler just wrote).
        build = copy.copy(self)
        build.build_temp = os.path.join(self.build_temp, ext.name)
        super(BuildLibraries, build).build_extension(ext)

    def get_ext_filename(self, fullname: str) -> str:
        return fullname.replace(".", os.sep) + ".so"


def source_hash() -> str:
    """What the libraries are built from: the package checks it against its sources at load
    (an editable install whose ops.cc changed must be rebuilt, not run stale)."""
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(Path(KERNELS, source).read_bytes())
    return digest.hexdigest()


def library(name: str, source: str, flags: list[str], **options) -> Extension:
    return Extension(f"nanovllm_onnx.kernels.{name}", [f"{KERNELS}/{source}"], language="c++",
                     extra_compile_args=[*FLAGS, *flags], extra_link_args=["-Wl,-Bsymbolic"],
                     **options)


SOURCES = ("dispatch.cc", "ops.cc")
setup(
    ext_modules=[library("ops", "dispatch.cc", [], depends=[f"{KERNELS}/ops.cc"],
                         define_macros=[("NANOVLLM_SOURCE_HASH", f'"{source_hash()}"')]),
                 *(library(f"ops_{target}", "ops.cc", flags) for target, flags in TARGETS.items())],
    cmdclass={"build_ext": BuildLibraries},
)
