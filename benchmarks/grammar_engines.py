"""llguidance vs xgrammar on this CPU: grammar compile time and token-mask time per step.

    python benchmarks/grammar_engines.py --tokenizer SMOLLM2/tokenizer.json \
        --tokenizer QWEN/tokenizer.json [--xgrammar-path DIR]

For each tokenizer: the time to build the engine's tokenizer data, the time to compile the
benchmark schema (and a harder one) from a cold cache, and the time per token to compute the
mask while walking a valid answer token by token. xgrammar needs torch and transformers at
import time; --xgrammar-path adds a folder where `pip install --no-deps --target DIR xgrammar
apache-tvm-ffi` put it, so the project's venv is not changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from workloads import log

SCHEMA = {  # the same shape as throughput.py --structured
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "kind": {"enum": ["person", "company", "place"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                     "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
    },
    "required": ["name", "kind", "age", "address", "tags"],
    "additionalProperties": False,
}
ANSWER = json.dumps({"name": "Ada Lovelace", "kind": "person", "age": 36,
                     "address": {"city": "London", "zip": "12345"},
                     "tags": ["math", "engines", "poetry"]})
HARD = {"type": "object", "properties": {
    f"field_{i}": {"anyOf": [{"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1},20}}$"},
                             {"type": "integer", "minimum": -i, "maximum": 1000 * i},
                             {"type": "array", "items": {"$ref": "#/$defs/node"}}]}
    for i in range(40)}, "$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "number"}, "children": {"type": "array",
                                                  "items": {"$ref": "#/$defs/node"}}}}}}


def bench_llguidance(tokenizer_json: str, answer_ids: list[int]) -> dict:
    import llguidance as llg
    import llguidance.numpy as lln

    t = time.perf_counter()
    tok = llg.LLTokenizer(open(tokenizer_json).read())
    init = time.perf_counter() - t
    out = {"tokenizer_init_s": init}
    for name, schema in (("schema", SCHEMA), ("hard", HARD)):
        t = time.perf_counter()
        matcher = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_json_schema(schema))
        assert not matcher.is_error(), matcher.get_error()
        matcher.compute_bitmask()  # the first mask builds the lexer's first states
        out[f"compile_{name}_s"] = time.perf_counter() - t
    matcher = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_json_schema(SCHEMA))
    mask = lln.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for token in answer_ids:
        t = time.perf_counter()
        lln.fill_next_token_bitmask(matcher, mask)
        times.append(time.perf_counter() - t)
        assert matcher.consume_token(token), matcher.get_error()
    out["mask_ms_median"] = 1000 * float(np.median(times))
    out["mask_ms_mean"] = 1000 * float(np.mean(times))
    out["mask_ms_max"] = 1000 * float(np.max(times))
    return out


def bench_xgrammar(tokenizer_json: str, answer_ids: list[int]) -> dict:
    t = time.perf_counter()
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    out = {"import_s": time.perf_counter() - t,
           "imports_torch": "torch" in sys.modules}
    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
    out["tokenizer_init_s"] = time.perf_counter() - t
    for name, schema in (("schema", SCHEMA), ("hard", HARD)):
        compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema))
        out[f"compile_{name}_s"] = time.perf_counter() - t
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA))
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for token in answer_ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t)
        assert matcher.accept_token(token)
    out["mask_ms_median"] = 1000 * float(np.median(times))
    out["mask_ms_mean"] = 1000 * float(np.mean(times))
    out["mask_ms_max"] = 1000 * float(np.max(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", action="append", required=True)
    ap.add_argument("--xgrammar-path", default=None)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    for path in args.tokenizer:
        tok = Tokenizer.from_file(path)
        ids = tok.encode(ANSWER, add_special_tokens=False).ids
        log(f"{path}: vocab {tok.get_vocab_size()}, answer {len(ids)} tokens")
        res = {"llguidance": bench_llguidance(path, ids)}
        if args.xgrammar_path:
            sys.path.insert(0, args.xgrammar_path)
            res["xgrammar"] = bench_xgrammar(path, ids)
        for engine, r in res.items():
            log(f"  {engine:<10} " + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
        print(json.dumps({"tokenizer": path, "vocab": tok.get_vocab_size(), **res}))


if __name__ == "__main__":
    main()
