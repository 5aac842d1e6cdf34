"""Side-by-side comparison (issue 6): nano-vllm-onnx and every installed peer, in one invocation.

    python benchmarks/compare.py                       # workloads A and B, median of 3
    python benchmarks/compare.py --workload B --only ours openvino
    python benchmarks/compare.py --rounds 3 --markdown results.md --json results.json
    python benchmarks/compare.py --only ours llamacpp --files Q4_K_M Q8_0   # the same GGUFs
    python benchmarks/compare.py --model 1b --repeats 1   # the Llama-3.2-1B-shaped model
    python benchmarks/compare.py --model 8b --workload A --repeats 1   # ours and llama.cpp

Each engine runs in its own process with its own virtual environment's python (peers are set up
by setup_peers.sh under ~/.cache/nano-vllm-onnx/peers), one process per workload, so B's peak
RSS is B's alone. Ratios are our best weight format's figure (the format named) / the peer's,
or, for a peer running a GGUF file ours also ran, ours on that file / the peer's: above 1 means
nano-vllm-onnx is faster. With
--rounds N the whole sequence of engines runs N times and each figure is the median over the
rounds: a shared machine's slow drifts then fall on every engine alike.
--model 1b compares on the Llama-3.2-1B-shaped random checkpoint (setup_peers.sh llama1b) and
its GGUFs and exports, with the smaller B ("Bs" of workloads.py) in B's column; --model 8b on
the Llama-3.1-8B-shaped one (setup_peers.sh llama8b) against llama.cpp on its Q4_K_M GGUF.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from workloads import PEERS, log, median, run_runner

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Config:
    group: str  # for --only
    script: str
    args: tuple[str, ...]
    python: Path | None  # None: this python (ours, and llama.cpp's stdlib-only client)
    needs: tuple[Path, ...]  # installed when these exist
    file: str | None = None  # the GGUF quantization it runs, where it runs one of the model's

    def argv(self, workload: str, repeats: int) -> list[str]:
        return [str(self.python or sys.executable), str(HERE / self.script), *self.args,
                "--workload", workload, "--repeats", str(repeats)]


def venv_python(name: str) -> Path:
    return PEERS / name / "venv/bin/python"


def gguf(quantization: str) -> Path:
    """The default model as a GGUF of this quantization (setup_peers.sh makes them)."""
    return PEERS / "llamacpp" / f"model-{quantization}.gguf"


HF_135M = PEERS / "hf/SmolLM2-135M-Instruct"
B_WORKLOAD = {"135m": "B", "1b": "Bs", "8b": "Bs"}  # what runs in B's column
# The Llama-shaped random checkpoints: our formats from the checkpoint, and the GGUFs made of it
# (setup_peers.sh llama1b / llama8b). At 8B only llama.cpp: OpenVINO's and onnxruntime-genai's
# exporters load the whole model in float32 (32 GB), more than these machines have.
LLAMA_RUNS = {"1b": (("auto", "int4", "int4_all"), ("Q4_K_M", "Q8_0")),
              "8b": (("int4", "int4_all"), ("Q4_K_M",))}


def configs(model: str, ours_args: list[str]) -> list[Config]:
    ov, og, vl = venv_python("openvino"), venv_python("ortgenai"), venv_python("vllm")
    if model in LLAMA_RUNS:
        hf = PEERS / f"hf/llama-{model}"
        formats, files = LLAMA_RUNS[model]
        ggufs = {w: PEERS / "llamacpp" / f"llama-{model}-{w}.gguf" for w in files}
        runs = [
            # From the HF checkpoint and from the GGUFs (their own blocks).
            *[Config("ours", "throughput.py", ("--model", str(hf), "--weights", w, *ours_args),
                     None, (hf / "config.json",)) for w in formats],
            *[Config("ours", "throughput.py", ("--model", str(f), "--weights", "auto",
                                               *ours_args), None, (f,), w)
              for w, f in ggufs.items()],
            *[Config("llamacpp", "peer_llamacpp.py", ("--weights", w, "--model", str(f)), None,
                     (f,), w) for w, f in ggufs.items()],
        ]
        if model != "1b":
            return runs
        export = {w: PEERS / "openvino" / f"llama-1b-{w}" for w in ("int4", "int8")}
        og_int4 = PEERS / "ortgenai/llama-1b-int4"
        return [
            *runs,
            *[Config("openvino", "peer_openvino.py", ("--weights", w, "--model", str(d)), ov,
                     (ov, d / "openvino_model.xml")) for w, d in export.items()],
            Config("ortgenai", "peer_ortgenai.py", ("--precision", "int4", "--model",
                                                    str(og_int4)), og,
                   (og, og_int4 / "genai_config.json")),
            Config("vllm", "peer_vllm.py", ("--model", str(hf)), vl, (vl, hf / "config.json")),
        ]
    return [
        *[Config("ours", "throughput.py", ("--weights", w, *ours_args), None, ())
          for w in ("int8", "fp32", "int4")],
        *[Config("openvino", "peer_openvino.py", ("--weights", w), ov,
                 (ov, PEERS / "openvino" / w / "openvino_model.xml"))
          for w in ("int8", "fp32", "int4")],
        *[Config("ortgenai", "peer_ortgenai.py", ("--precision", p), og,
                 (og, PEERS / "ortgenai" / p / "genai_config.json")) for p in ("int4", "fp32")],
        # The same GGUF files: ours runs their own blocks (auto), llama.cpp runs them.
        *[Config("ours", "throughput.py", ("--model", str(gguf(w)), "--weights", "auto",
                                           *ours_args), None, (gguf(w),), w)
          for w in ("Q4_K_M", "Q8_0")],
        *[Config("llamacpp", "peer_llamacpp.py", ("--weights", w), None, (gguf(w),), w)
          for w in ("Q8_0", "Q4_1", "Q4_K_M")],
        Config("transformers", "peer_transformers.py", (), venv_python("transformers"),
               (HF_135M / "model.safetensors",)),
        Config("vllm", "peer_vllm.py", ("--model", str(HF_135M)), vl,
               (vl, HF_135M / "model.safetensors")),
    ]


COLUMNS = [("A", "prefill_tok_s", "A prefill tok/s"), ("A", "decode_tok_s", "A decode tok/s"),
           ("B", "output_tok_s", "B output tok/s")]
RATES = {key for _, key, _ in COLUMNS}


def combine_rounds(results: list[dict]) -> dict:
    """One engine's results for one workload over the rounds: the median of each rate, the
    highest peak RSS and CPU busyness, each round's rates under "rounds" (in place of one
    round's per-run timings)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    out = dict(ok[0])
    for key in RATES & out.keys():
        out[key] = median([r[key] for r in ok])
    for key in ("peak_rss_mib", "busy_before"):
        if key in out:
            out[key] = max(r.get(key, 0.0) for r in results)
    if len(results) > 1:  # one round's per-run timings would not match the medians
        for key in ("runs", "walls_s", "wall_s"):
            out.pop(key, None)
        out["rounds"] = [{k: r[k] for k in RATES & r.keys()} or {"error": r.get("error")}
                         for r in results]
    return out


OURS = "nano-vllm-onnx"


def is_ours(row: dict[str, dict]) -> bool:
    return any(r.get("engine") == OURS for r in row.values())


def row_file(row: dict[str, dict]) -> str | None:
    return next(iter(row.values())).get("file")


def best_of_ours(rows: list[dict[str, dict]], file: str | None = None
                 ) -> dict[str, tuple[float, str]]:
    """For each rate, our best figure over our weight formats (over our runs of `file`, if
    any ran it) and the format that reached it (a peer's ratio is against it, named)."""
    best: dict[str, tuple[float, str]] = {}
    ours = list(filter(is_ours, rows))
    same_file = [row for row in ours if file is not None and row_file(row) == file]
    for row in same_file or ours:
        for workload, key, _ in COLUMNS:
            res = row.get(workload, {})
            if key in res and res[key] > best.get(key, (0.0, ""))[0]:
                best[key] = (res[key], res.get("weights", "?"))
    return best


def table(rows: list[dict[str, dict]]) -> str:
    head = ["engine", "weights", *[c[2] for c in COLUMNS], "B peak RSS MiB", "CPU busy before"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        best = best_of_ours(rows, row_file(row))
        label = row.get("B") or next(iter(row.values()))  # B's label names its batching
        cells = [label.get("engine", "?"), label.get("weights", "?")]
        for workload, key, _ in COLUMNS:
            res = row.get(workload, {})
            if key not in res:
                cells.append(res.get("error", "-")[:40])
                continue
            cell = f"{res[key]:,.1f}"
            if key in best and not is_ours(row):
                mine, weights = best[key]
                cell += f" (ours {weights} {mine / res[key]:.2f}x)"
            cells.append(cell)
        rss = row.get("B", {}).get("peak_rss_mib")
        cells.append(f"{rss:,.0f}" if rss else "-")
        busy = [r["busy_before"] for r in row.values() if "busy_before" in r]
        cells.append(f"{100 * max(busy):.0f}%" if busy else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all cores busy over a short window (other users of a shared machine)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(limit: float, max_wait: float) -> float:
    """Wait (up to max_wait seconds) until the CPUs are at most `limit` busy; returns the share."""
    deadline = time.time() + max_wait
    busy = cpu_busy()
    while busy > limit and time.time() < deadline:
        log(f"  machine {100 * busy:.0f}% busy; waiting")
        busy = cpu_busy(5.0)
    return busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(B_WORKLOAD), default="135m",
                    help="135m: the default model; 1b, 8b: the Llama-3.2-1B- and "
                         "Llama-3.1-8B-shaped random checkpoints (B's column runs the smaller Bs)")
    ap.add_argument("--workload", nargs="+", choices=["A", "B"], default=["A", "B"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, in turn; report the medians")
    ap.add_argument("--only", nargs="+", default=None,
                    help="groups to run: ours openvino ortgenai llamacpp transformers vllm")
    ap.add_argument("--files", nargs="+", default=None,
                    help="only the runs of the model's GGUFs of these quantizations "
                         "(Q4_K_M Q8_0 Q4_1): ours auto and llama.cpp on the same files")
    ap.add_argument("--ours-args", default="", help="extra throughput.py arguments for ours")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per engine and workload")
    ap.add_argument("--idle", type=float, default=0.15,
                    help="before each engine, wait until the CPUs are at most this busy")
    ap.add_argument("--idle-wait", type=float, default=180, help="seconds to wait at most")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--markdown", type=Path, help="write the table here")
    ap.add_argument("--table-from", type=Path, help="print the table of an earlier --json; no run")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    if args.table_from:
        print(table(json.loads(args.table_from.read_text())))
        return
    selected = []
    for cfg in configs(args.model, args.ours_args.split()):
        if args.only and cfg.group not in args.only:
            continue
        if args.files and cfg.file not in args.files:
            continue
        missing = [p for p in cfg.needs if not p.exists()]
        if missing:
            log(f"skip {cfg.script} {' '.join(cfg.args)}: not installed ({missing[0]} missing; "
                "run benchmarks/setup_peers.sh)")
            continue
        selected.append(cfg)
    runs: list[dict[str, list[dict]]] = [{w: [] for w in args.workload} for _ in selected]
    for round_ in range(args.rounds):
        if args.rounds > 1:
            log(f"round {round_ + 1} of {args.rounds}")
        for cfg, results in zip(selected, runs):
            for workload in args.workload:
                results[workload].append(run_one(cfg, workload, args))
    rows = [{w: combine_rounds(rs) for w, rs in results.items()} for results in runs]

    machine = f"{platform.processor() or platform.machine()}, {_cpu_name()}"
    rounds = f" in each of {args.rounds} rounds (median over rounds)" if args.rounds > 1 else ""
    model = {"135m": "SmolLM2-135M-Instruct",
             "1b": "Llama-3.2-1B-shaped random checkpoint, B's column is workload Bs",
             "8b": "Llama-3.1-8B-shaped random checkpoint, B's column is workload Bs"}
    text = (f"Model: {model[args.model]}. Machine: {machine}; every engine 2 threads; median of "
            f"{args.repeats}{rounds}; ratios are our best format's figure (ours on the same file "
            "where it ran it) / the peer's.\n\n" + table(rows))
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def run_one(cfg: Config, workload: str, args: argparse.Namespace) -> dict:
    """One engine on one workload, in its own process, once the machine is quiet enough."""
    busy = wait_idle(args.idle, args.idle_wait)
    t = time.perf_counter()
    runner_workload = B_WORKLOAD[args.model] if workload == "B" else workload
    try:
        res = run_runner(cfg.argv(runner_workload, args.repeats), args.timeout)
    except Exception as e:  # a broken peer must not stop the comparison
        log(f"FAILED: {e}")
        res = {"engine": f"{cfg.group} {' '.join(cfg.args)}", "weights": "",
               "error": f"failed: {str(e).splitlines()[0]}"}
    res["busy_before"] = busy
    res["file"] = cfg.file
    log(f"  {workload} done in {time.perf_counter() - t:.0f} s: "
        + json.dumps({k: v for k, v in res.items() if not k.startswith(("runs", "walls"))}))
    return res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
