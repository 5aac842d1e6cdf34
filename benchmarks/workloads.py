"""The benchmark workloads of issue 6 (and C of issue 17), defined once for every engine.

Standard library only: the peer runners import this from their own virtual environments.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

THREADS = 2  # every engine runs with 2 threads
ID_MAX = 10_000  # prompt ids: randint(0, ID_MAX), both ends included
PAD_ID = 49_151  # a pad id no prompt contains (random prompts contain id 2, the EOS/pad of some)
RESULT_PREFIX = "RESULT "  # a runner's last line: RESULT {json}
# Where setup_peers.sh puts the peers' venvs and models (its $PEERS, same default).
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache/nano-vllm-onnx/peers"))


def random_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Prompts of `length` random token ids (below ID_MAX), distinct per request: the shape
    of vLLM's `bench serve` random dataset."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, ID_MAX, (count, length)).tolist()


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def workload_a(seed: int = 1) -> Workload:
    """One prompt of 128 random ids, 128 greedy tokens, EOS ignored. Another seed gives a fresh
    prompt of the same shape (for timing prefill without any prefix cache)."""
    rng = random.Random(seed)
    return Workload("A", [[rng.randint(0, ID_MAX) for _ in range(128)]], [128])


B_SHAPES = {  # name: requests, prompt length range, output length range
    "B": (32, (64, 512), (64, 256)),
    # B at 1B parameters, where a full B takes an engine on 2 cores several minutes per run.
    "Bs": (16, (32, 256), (32, 128)),
}


def workload_b(name: str = "B") -> Workload:
    """nano-vLLM's bench.py scaled down: 32 prompts of 64-512 ids, then 64-256 outputs each
    (all submitted at once). "Bs", the smaller B for 1B models: 16 prompts of 32-256 ids, then
    32-128 outputs each."""
    count, (p_lo, p_hi), (o_lo, o_hi) = B_SHAPES[name]
    rng = random.Random(0)
    prompts = [[rng.randint(0, ID_MAX) for _ in range(rng.randint(p_lo, p_hi))]
               for _ in range(count)]
    max_tokens = [rng.randint(o_lo, o_hi) for _ in range(count)]
    return Workload(name, prompts, max_tokens)


APACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "apache-2.0.txt")
C_TASKS = [  # (instruction, first and last line of the passage in apache-2.0.txt)
    ("Repeat the following text exactly, word for word.", 8, 38),
    ("Quote this passage of the Apache License exactly as it is written.", 50, 80),
    ("Copy the text below, replacing every \"License\" with \"Licence\".", 86, 116),
]
C_MAX_TOKENS = 256


def workload_c_messages() -> list[str]:
    """Issue 17's input-grounded workload: each prompt (one user message, run alone with the
    model's chat template, 256 greedy tokens, EOS ignored) asks to repeat, quote or lightly
    edit a passage of the Apache-2.0 text that it embeds."""
    with open(APACHE) as f:
        lines = f.read().splitlines()
    return [f"{task}\n\n" + "\n".join(line.strip() for line in lines[first:last])
            for task, first, last in C_TASKS]


B_PROMPT_TOKENS, B_OUTPUT_TOKENS = 9_850, 5_006
_b = workload_b()
assert (_b.prompt_tokens, _b.output_tokens) == (B_PROMPT_TOKENS, B_OUTPUT_TOKENS), (
    _b.prompt_tokens, _b.output_tokens)
assert PAD_ID not in {t for p in _b.prompts + workload_a().prompts for t in p}


def median(values: list[float]) -> float:
    return statistics.median(values)


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """The median CPU and the median wall time of (CPU, wall) samples."""
    return (statistics.median(cpu for cpu, _ in samples),
            statistics.median(wall for _, wall in samples))


def time_calls(call: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Median (CPU, wall) seconds per call over about `seconds` of calls, after a warm-up."""
    call()
    samples: list[tuple[float, float]] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 3:
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        samples.append((time.process_time() - start_cpu, time.perf_counter() - start))
    return medians(samples)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pid_peak_rss_mib(pid: int) -> float:
    """Peak resident memory of another live process (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def emit(result: dict) -> None:
    """Print a runner's result for compare.py to pick up."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_a(engine: str, weights: str, run: Callable[[list[int], int], tuple[float, float]],
              repeats: int) -> None:
    """Workload A for a runner: `run(prompt, n)` generates n tokens after the prompt and gives
    (time to first token, time per output token after it); a warm-up of 8 tokens, then
    `repeats` runs; emits the medians as rates."""
    prompt = workload_a().prompts[0]
    run(prompt, 8)
    runs = [run(prompt, 128) for _ in range(repeats)]
    emit({"engine": engine, "weights": weights, "workload": "A",
          "prefill_tok_s": len(prompt) / median([r[0] for r in runs]),
          "decode_tok_s": 1 / median([r[1] for r in runs])})


def measure_b(engine: str, weights: str, wl: Workload, run: Callable[[Workload], float],
              repeats: int, peak_rss: Callable[[], float] = peak_rss_mib) -> None:
    """Workload B (or Bs) for a runner: `run(wl)` generates every request of wl and gives the
    wall seconds; a warm-up of 4 short requests, then `repeats` runs; emits the median rate and
    `peak_rss()` (MiB) taken after them."""
    run(Workload("warm", wl.prompts[:4], [4] * 4))
    walls = []
    for _ in range(repeats):
        walls.append(run(wl))
        log(f"{engine} {weights} {wl.name}: {wl.output_tokens / walls[-1]:.1f} tok/s")
    emit({"engine": engine, "weights": weights, "workload": wl.name,
          "output_tok_s": wl.output_tokens / median(walls), "wall_s": median(walls),
          "walls_s": walls, "peak_rss_mib": peak_rss()})


def limit_threads() -> None:
    """Pin the math libraries of a peer process to THREADS before they load."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(THREADS))


def run_runner(argv: list[str], timeout: float = 1800, env: dict | None = None) -> dict:
    """Run a runner script in its own process (and venv); its stderr passes through. On a
    timeout its whole process group is killed: a server it started (llama-server) too, which
    would otherwise go on loading the machine for every engine after it."""
    import signal
    import subprocess

    log("$ " + " ".join(argv))
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True,
                          env={**os.environ, **(env or {})}) as proc:
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    results = [line[len(RESULT_PREFIX):] for line in stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not results:
        raise RuntimeError(f"{argv[1]} failed (exit {proc.returncode}): {stdout[-2000:]}")
    return json.loads(results[-1])
