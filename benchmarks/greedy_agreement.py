"""Greedy agreement with a GGUF's own weights: ours (`auto`: the file's blocks) next to llama.cpp.

    python benchmarks/greedy_agreement.py FILE.gguf [FILE.gguf ...] [--tokens 64]

The reference is transformers on the file's dequantized weights (fp32). For each held-out chat
prompt, the fraction of the greedy continuation that agrees with the reference before the
first difference (a near-tie flips every token after it, so the mean of that fraction is the
measure); EOS is ignored. llama.cpp runs the same file and the same prompt ids through its C API
(benchmarks/llamacpp_greedy.cpp, built by setup_peers.sh under $PEERS: the argmax of its logits
at each step). Both round activations to 8 bits per block, so neither should lose more than the
other.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np
from peer_llamacpp import LLAMACPP
from workloads import THREADS, log

LLAMACPP_GREEDY = LLAMACPP / "bin/llamacpp_greedy"

PROMPTS = [  # held out: used for nothing else in the project
    "Write a short poem about the sea at night.",
    "Explain what a binary search tree is.",
    "List three uses of copper.",
    "What causes the seasons on Earth?",
    "Give me a recipe for pancakes.",
    "How do I reverse a list in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
]


def prefix_share(tokens: list[int], reference: list[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b),
                len(reference))
    return same / len(reference)


def transformers_greedy(path: Path, prompts: list[list[int]], n: int, threads: int
                        ) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
            out.append(ids[0, len(prompt):].tolist())
    return out


def ours_greedy(path: Path, prompts: list[list[int]], n: int, threads: int) -> list[list[int]]:
    from nanovllm_onnx import LLM, SamplingParams

    llm = LLM(str(path), weights="auto", intra_op_num_threads=threads)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def llamacpp_greedy(path: Path, prompts: list[list[int]], n: int, threads: int
                    ) -> list[list[int]]:
    stdin = "".join(" ".join(map(str, p)) + "\n" for p in prompts)
    result = subprocess.run([str(LLAMACPP_GREEDY), str(path), str(n), str(threads)],
                            input=stdin, capture_output=True, text=True, check=True)
    return [[int(t) for t in line.split()[2:]] for line in result.stdout.splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="the first N prompts")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="threads of each engine (the tokens do not depend on it: each output "
                         "row is one thread's dot products; 1 keeps a shared machine's "
                         "spin-waiting thread pools from crawling)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    rows = []
    for path in args.gguf:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=False) for p in PROMPTS[:args.prompts]]
        reference = transformers_greedy(path, prompts, args.tokens, args.threads)
        log(f"{path.name}: transformers done")
        shares = {"ours auto": ours_greedy(path, prompts, args.tokens, args.threads)}
        if LLAMACPP_GREEDY.exists():
            shares["llama.cpp"] = llamacpp_greedy(path, prompts, args.tokens, args.threads)
        for engine, tokens in shares.items():
            per_prompt = [prefix_share(t, r) for t, r in zip(tokens, reference, strict=True)]
            log(f"{path.name} {engine}: {[round(s, 2) for s in per_prompt]}")
            rows.append((path.name, engine, float(np.mean(per_prompt))))
    print(f"\nGreedy agreement with transformers on the file ({args.prompts} prompts, "
          f"{args.tokens} tokens each)\n\n| file | engine | agreement |\n| --- | --- | --- |")
    for name, engine, share in rows:
        print(f"| {name} | {engine} | {share:.0%} |")


if __name__ == "__main__":
    main()
