"""Peak memory and time of a conversion, per weight format, against the time it takes just to
read the source and write as many bytes as the conversion writes (the I/O floor).

    python benchmarks/convert_memory.py /work/data/llama-3b --out /work/data/converted

Each conversion and each I/O floor runs in its own process (peak RSS from getrusage), on a
warm source (read once first); the converted folder is deleted after each (kept with --keep).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nanovllm_onnx.config import WEIGHT_FORMATS

CONVERT = """
import sys, time, resource
from pathlib import Path
from nanovllm_onnx.convert.converter import convert
t = time.perf_counter()
convert(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
print(time.perf_counter() - t)
"""

# Read every source file and write `size` bytes, 64 MiB at a time, as a conversion would.
COPY = """
import os, sys, time
from pathlib import Path
src, out, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
buf = bytearray(64 << 20)
with open(out, "wb") as dst:
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                pass
    while size > 0:
        size -= dst.write(memoryview(buf)[:min(size, len(buf))])
print(time.perf_counter() - t)
"""


def run(code: str, *args: str) -> tuple[float, float, float]:
    """(seconds the code reports, its CPU seconds, peak RSS in GiB of this process's children
    so far). CPU time says more than wall time on a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return float(done.stdout.split()[-1]), cpu, after.ru_maxrss / 2**20


def measure(source: Path, out: Path, weights: str, keep: bool = False) -> dict:
    folder = out / f"{source.name}-{weights}"
    seconds, cpu, rss = run(CONVERT, str(source), str(folder), weights)
    written = sum(f.stat().st_size for f in folder.iterdir())
    if not keep:
        shutil.rmtree(folder)
    copy = out / "io-floor.bin"
    floor, floor_cpu, _ = run(COPY, str(source), str(copy), str(written))
    copy.unlink()
    return dict(weights=weights, seconds=round(seconds, 1), peak_rss_gib=round(rss, 2),
                written_gib=round(written / 2**30, 2), io_floor_seconds=round(floor, 1),
                ratio=round(seconds / floor, 2), cpu_seconds=round(cpu, 1),
                io_floor_cpu_seconds=round(floor_cpu, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", nargs="+", default=list(WEIGHT_FORMATS))
    parser.add_argument("--keep", action="store_true", help="keep the converted folders")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # Every run reads a warm source (the page cache holds it), the first conversion as the rest.
    for f in sorted(p for p in args.source.iterdir() if p.is_file()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    for weights in args.weights:
        # getrusage's children peak is a maximum over all children: one parent per format.
        code = "import json, sys; from benchmarks.convert_memory import measure; " \
               "print(json.dumps(measure(*map(__import__('pathlib').Path, sys.argv[1:3]), " \
               "sys.argv[3], sys.argv[4] == 'keep')))"
        done = subprocess.run([sys.executable, "-c", code, str(args.source), str(args.out),
                               weights, "keep" if args.keep else ""], capture_output=True,
                              text=True)
        if done.returncode:
            sys.exit(done.stderr)
        print(json.dumps(json.loads(done.stdout.splitlines()[-1])), flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
