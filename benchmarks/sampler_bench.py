"""The sampler alone, checkout against checkout: ms per step of 32 x 128,256 float32 logits.

    python benchmarks/sampler_bench.py --against /work/main      # before / after in one run
    python benchmarks/sampler_bench.py --rows 16 --vocab 49152 --rounds 3

Logit rows of three shapes: flat (normal, sd 1: what a random-weight model gives, the random
1B model's sd is 0.9; or a trained one at a high temperature: top_p 0.9 keeps ~80% of the
vocabulary), spread (sd 2: a nucleus of thousands, but p * z below the 256 first candidates)
and peaked (sd 6: a nucleus of tens of tokens, as a trained model at low temperature), each
under the sampling settings below, seeded. --against DIR times DIR's
nanovllm_onnx/engine/sampler.py (loaded by path) too, case by case in turn with this
checkout's (who goes first alternates by round), and checks that both give the same tokens.
One sampler thread, timed in CPU seconds of the calling thread (which other processes' load
changes less than the wall time): each figure is the median over rounds of a round's least
time per call.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from nanovllm_onnx.engine import sampler as this_sampler
from nanovllm_onnx.engine.sequence import Sequence
from nanovllm_onnx.sampling_params import SamplingParams

SHAPES = {"flat": 1.0, "spread": 2.0, "peaked": 6.0}  # the logits' standard deviation
SETTINGS = {
    "temperature 1": {},
    "top_p 0.9": {"top_p": 0.9},
    "top_p 0.95": {"top_p": 0.95},
    "top_k 50, top_p 0.95": {"top_k": 50, "top_p": 0.95},
    "min_p 0.05": {"min_p": 0.05},
    "min_p 0.05, top_p 0.9": {"min_p": 0.05, "top_p": 0.9},
}


def load_sampler(checkout: str) -> ModuleType:
    path = Path(checkout) / "nanovllm_onnx/engine/sampler.py"
    spec = importlib.util.spec_from_file_location(f"sampler_of_{checkout}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_step(module: ModuleType, logits: np.ndarray, settings: dict,
              calls: int) -> tuple[float, list[int]]:
    """Least CPU seconds of `calls` calls (fresh seeded sequences, a fresh copy of the logits each)
    and the last call's tokens."""
    sampler = module.Sampler([2])
    best = float("inf")
    for _ in range(calls):
        seqs = [Sequence("r", [1], SamplingParams(max_tokens=None, seed=i, **settings))
                for i in range(len(logits))]
        x = logits.copy()
        start = time.thread_time()
        tokens = sampler(x, seqs)[0]
        best = min(best, time.thread_time() - start)
    return best, tokens.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5, help="per sampler, case and round")
    ap.add_argument("--against", metavar="DIR", default=None,
                    help="another checkout (e.g. /work/main): its sampler timed in the same run")
    args = ap.parse_args()

    samplers = {"this": this_sampler}
    if args.against:
        samplers = {"before": load_sampler(args.against), "this": this_sampler}
    rng = np.random.default_rng(0)
    logits = {shape: (rng.standard_normal((args.rows, args.vocab)) * sd).astype(np.float32)
              for shape, sd in SHAPES.items()}
    times: dict[tuple[str, str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = list(samplers.items())[::-1 if round_ % 2 else 1]  # who goes first alternates
        for shape in SHAPES:
            for name, settings in SETTINGS.items():
                tokens = {}
                for label, module in order:
                    seconds, tokens[label] = time_step(module, logits[shape], settings, args.calls)
                    times.setdefault((shape, name, label), []).append(seconds)
                if len(tokens) == 2 and tokens["before"] != tokens["this"]:
                    raise SystemExit(f"different tokens: {shape} logits, {name}")

    print(f"{args.rows} x {args.vocab:,} logits, CPU ms per step (1 thread), {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.1f}" + (", same tokens" if args.against else ""))
    labels = list(samplers)
    print("| logits | settings | " + " | ".join(labels) + (" | ratio |" if args.against else " |"))
    print("| --- " * (len(labels) + 2 + bool(args.against)) + "|")
    for shape in SHAPES:
        for name in SETTINGS:
            ms = [statistics.median(times[shape, name, label]) * 1e3 for label in labels]
            cells = " | ".join(f"{m:.1f}" for m in ms)
            ratio = f" | {ms[0] / ms[1]:.2f}x" if args.against else ""
            print(f"| {shape} | {name} | {cells}{ratio} |")


if __name__ == "__main__":
    main()
