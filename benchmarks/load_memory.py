"""Start-up time and memory of a converted model: load seconds, then RSS, PSS and the shared
part (from /proc/PID/smaps_rollup) after a short generation, against the weight bytes; with
--processes 2 a second process serves the same model beside the first (both measured while
both are up: PSS halves what they share through the page cache).

    python benchmarks/load_memory.py /work/data/llama-1b-int4 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nanovllm_onnx.config import ModelConfig

CHILD = """
import json, sys, time
t = time.perf_counter()
from nanovllm_onnx import LLM, SamplingParams
llm = LLM(sys.argv[1], kv_cache_memory_gib=float(sys.argv[2]))
load = time.perf_counter() - t
llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
print(json.dumps({"load_seconds": round(load, 2)}), flush=True)
sys.stdin.readline()  # stay up until told to go: the other process is measured meanwhile
"""


def memory(pid: int) -> dict[str, float]:
    """GiB of smaps_rollup's Rss, Pss, shared (clean and dirty) and anonymous pages."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) / 2**20
    return {"rss_gib": fields["Rss"], "pss_gib": fields["Pss"],
            "shared_gib": fields["Shared_Clean"] + fields["Shared_Dirty"],
            "anonymous_gib": fields["Anonymous"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--kv-cache-memory-gib", type=float, default=1.0)
    args = parser.parse_args()
    cfg = ModelConfig.load(args.model)
    weight_bytes = sum(f.stat().st_size for f in cfg.graph_file(args.model).parent.iterdir()
                       if f.name.startswith(cfg.graph_file(args.model).name))
    children, loads = [], []
    for _ in range(args.processes):  # one after the other: the second finds the page cache
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.model),
                                  str(args.kv_cache_memory_gib)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=os.environ)
        loads.append(json.loads(child.stdout.readline()))
        children.append(child)
    time.sleep(1)
    for i, (child, load) in enumerate(zip(children, loads)):
        row = {"process": i, **load, "weights_gib": weight_bytes / 2**30,
               **memory(child.pid)}
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in row.items()}))
    for child in children:
        child.communicate("\n")


if __name__ == "__main__":
    main()
