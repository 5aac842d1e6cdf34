"""`nano-vllm-onnx doctor`: what this machine gives the engine, for bug reports and tuning."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_int8", "amx_bf16")


def cpu_summary() -> tuple[str, list[str]]:
    """CPU model name and the instruction-set flags ONNX Runtime's kernels use."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.is_file() else ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() in ("flags", "Features"):
            flags = set(value.split())
    return model, [f for f in CPU_FLAGS if f in flags]


def report() -> str:
    import onnxruntime as ort

    from nanovllm_onnx.config import EngineConfig
    from nanovllm_onnx.default_model import cache_dir
    from nanovllm_onnx.kernels import KernelBuildError, custom_ops_library, kernel_target

    lines = [f"python {sys.version.split()[0]} on {platform.platform()}"]
    for package in ("nano-vllm-onnx", "onnxruntime", "onnx", "numpy", "tokenizers", "gguf"):
        try:
            lines.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package} not installed")
    model, flags = cpu_summary()
    cfg = EngineConfig()
    lines += [
        f"execution providers: {', '.join(ort.get_available_providers())}",
        f"cpu: {model}, {os.cpu_count()} logical cores, features: {' '.join(flags) or 'none'}",
        f"threads (defaults): {cfg.intra_op_num_threads} intra-op, "
        f"{cfg.inter_op_num_threads} inter-op",
        f"cache: {cache_dir()}",
    ]
    try:
        lines.append("kernels (SlotAttention, SwiGLU, BlockLinear, BlockGather): "
                     f"{kernel_target()} build of {custom_ops_library()}")
    except KernelBuildError as e:
        lines.append(f"kernels: NOT AVAILABLE: {e}")
    if not {"avx2", "fma", "f16c"} <= set(flags):
        lines.append("note: no AVX2/FMA/F16C: BlockLinear (auto, q8_0, int4 and int4_all "
                     "weights, every LM head but fp32's) runs its portable loop, far slower "
                     "than fp32 weights")
    elif "avx512_vnni" not in flags and "avx_vnni" not in flags and "amx_int8" not in flags:
        lines.append("note: no VNNI/AMX: 8-bit weights (auto, q8_0, int8) take two multiplies "
                     "per 32 products here, 4-bit ones one: --weights int4 runs fastest on this "
                     "CPU (a 1B model's prefill ~1.5x, decode ~1.6x auto's; see README)")
    return "\n".join(lines)
