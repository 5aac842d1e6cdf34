"""Perplexity of a peer's model on the same text as benchmarks/perplexity.py, so that speed
figures can be read next to the quality each peer pays for them.

    $PEERS/ortgenai/venv/bin/python benchmarks/peer_perplexity.py ortgenai $PEERS/ortgenai/int4
    $PEERS/openvino/venv/bin/python benchmarks/peer_perplexity.py openvino $PEERS/openvino/int8

Teacher-forced in one forward pass over the whole text: onnxruntime-genai's model.onnx through
plain onnxruntime (empty past), OpenVINO's IR through the openvino runtime on the CPU with its
default precision hint (the one the speed benchmark used). Tokens come from the model folder's
own tokenizer.json; the count is printed to check it matches ours.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

TEXT = Path(__file__).parent / "data" / "apache-2.0.txt"


def ortgenai_logits(model: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    decoder = json.loads((model / "genai_config.json").read_text())["model"]["decoder"]
    past_shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model / "model.onnx"), opts)
    feeds: dict[str, np.ndarray] = {"input_ids": ids[None],
                                    "attention_mask": np.ones((1, len(ids)), np.int64)}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):  # empty past
            feeds[inp.name] = np.zeros(past_shape, np.float32)
    return session.run(["logits"], feeds)[0][0]


def openvino_logits(model: Path, ids: np.ndarray) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(model / "openvino_model.xml"), "CPU",
                                       {"INFERENCE_NUM_THREADS": 2})
    request = compiled.create_infer_request()
    request.reset_state()
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None],
             "beam_idx": np.zeros(1, np.int32)}
    request.infer({k: v for k, v in feeds.items()
                   if any(k in p.get_names() for p in compiled.inputs)})
    return request.get_tensor("logits").data[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engine", choices=["ortgenai", "openvino"])
    parser.add_argument("model", type=Path, help="the peer's model folder")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    ids = np.array(tokenizer.encode(TEXT.read_text(), add_special_tokens=False).ids, np.int64)
    logits = (ortgenai_logits if args.engine == "ortgenai" else openvino_logits)(args.model, ids)
    logits = logits[:-1].astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    nll = -logprobs[np.arange(len(ids) - 1), ids[1:]].mean()
    print(f"{args.engine} {args.model.name}: perplexity {math.exp(nll):.3f} over {len(ids) - 1} "
          "tokens")


if __name__ == "__main__":
    main()
