"""Ray Data batch inference: the engine over a `ray.data.Dataset`, one engine per actor.

Each row has a `prompt` (text or token ids) and, optionally, `sampling_params` (a dict of
SamplingParams' fields, per row); the output rows add `generated_text`,
`generated_token_ids`, `finish_reason`, `num_prompt_tokens`, `num_generated_tokens` and
`error` (empty unless the row's prompt was refused). A batch's rows run together in the
engine's continuous batching.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data

from nanovllm_onnx.llm import LLM
from nanovllm_onnx.sampling_params import SamplingParams


class LLMPredictor:
    """A `map_batches` class (batch_format="numpy")."""

    def __init__(self, model: str | None = None, engine_args: dict[str, Any] | None = None
                 ) -> None:
        self.llm = LLM(model, **(engine_args or {}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in batch["prompt"]]
        rows = batch.get("sampling_params")
        params = [SamplingParams(**{k: v for k, v in row.items() if v is not None})
                  for row in rows] if rows is not None else [SamplingParams()] * len(prompts)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        choices = [out.outputs[0] if out.outputs else None for out in outputs]
        columns = {
            "generated_text": [c.text if c else "" for c in choices],
            "generated_token_ids": [list(c.token_ids) if c else [] for c in choices],
            "finish_reason": [c.finish_reason if c else "error" for c in choices],
            "num_prompt_tokens": [len(out.prompt_token_ids) for out in outputs],
            "num_generated_tokens": [len(c.token_ids) if c else 0 for c in choices],
            "error": [out.error or "" for out in outputs],
        }
        return {**batch, **{name: _column(values) for name, values in columns.items()}}


def _column(values: list[Any]) -> np.ndarray:
    if values and isinstance(values[0], list):  # ragged: one list per row
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column
    return np.asarray(values)


def generate_dataset(dataset: ray.data.Dataset, model: str | None = None,
                     engine_args: dict[str, Any] | None = None, *, concurrency: int = 1,
                     batch_size: int = 64) -> ray.data.Dataset:
    """The dataset with the generation columns, over `concurrency` engine actors, each
    reserving intra_op_num_threads CPUs (default 1 here: one core per engine)."""
    engine_args = {"intra_op_num_threads": 1, **(engine_args or {})}
    return dataset.map_batches(
        LLMPredictor, fn_constructor_kwargs={"model": model, "engine_args": engine_args},
        batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
        num_cpus=engine_args["intra_op_num_threads"])
