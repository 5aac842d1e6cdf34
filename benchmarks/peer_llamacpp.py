"""Peer runner: llama.cpp's llama-server (built by setup_peers.sh, AMX off), 2 threads.

A: one slot; TTFT and TPOT from the server's own timings for one /completion request.
B: 32 slots (`-np 32`), the 32 requests sent at once, greedy, EOS ignored, no prompt cache.
Standard library only: runs with any python.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from workloads import (
    B_SHAPES,
    PEERS,
    THREADS,
    Workload,
    log,
    measure_a,
    measure_b,
    pid_peak_rss_mib,
    workload_b,
)

LLAMACPP = PEERS / "llamacpp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, slots: int, context: int, extra: list[str]) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [str(LLAMACPP / "bin/llama-server"), "-m", str(model), "-t", str(THREADS),
                "-tb", str(THREADS), "-np", str(slots), "-c", str(context), "-no-kvu",
                "--no-cache-prompt",
                "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], *extra]
        log("$ " + " ".join(argv))
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {self.proc.returncode}") from None
            time.sleep(0.5)
        raise RuntimeError("llama-server did not come up")

    def complete(self, prompt: list[int], n: int) -> dict:
        body = {"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0.0,
                "top_k": 1, "cache_prompt": False, "stream": False}
        req = urllib.request.Request(self.url + "/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as r:
            out = json.load(r)
        assert out["timings"]["predicted_n"] == n, out["timings"]
        return out

    def peak_rss_mib(self) -> float:
        return pid_peak_rss_mib(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_a(server: Server, prompt: list[int], n: int) -> tuple[float, float]:
    """Time to first token and per output token after it, from the server's own timings."""
    timings = server.complete(prompt, n)["timings"]
    return len(prompt) / timings["prompt_per_second"], 1 / timings["predicted_per_second"]


def run_b(server: Server, wl: Workload) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(wl.prompts)) as pool:
        list(pool.map(server.complete, wl.prompts, wl.max_tokens))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", choices=["Q8_0", "Q4_1", "Q4_K_M", "F32"], default="Q8_0")
    ap.add_argument("--workload", choices=["A", *B_SHAPES], required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None,
                    help="GGUF file (default: the default model's, of --weights)")
    ap.add_argument("--server-args", default="", help="extra llama-server arguments")
    args = ap.parse_args()
    model = args.model or LLAMACPP / f"model-{args.weights}.gguf"
    extra = args.server_args.split()
    if args.workload == "A":
        server = Server(model, 1, 4096, extra)
        try:
            measure_a("llama.cpp llama-server", args.weights, partial(run_a, server),
                      args.repeats)
        finally:
            server.close()
    else:
        wl = workload_b(args.workload)
        server = Server(model, len(wl.prompts), 32768, extra)
        try:
            measure_b("llama.cpp llama-server (-np 32)", args.weights, wl,
                      partial(run_b, server), args.repeats, server.peak_rss_mib)
        finally:
            server.close()


if __name__ == "__main__":
    main()
