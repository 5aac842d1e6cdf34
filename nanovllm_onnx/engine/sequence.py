"""A sequence: one prompt and the tokens generated for it (one sample of a request)."""

from __future__ import annotations

from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING

import numpy as np

from nanovllm_onnx.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm_onnx.engine.structured import GrammarMatcher
    from nanovllm_onnx.engine.tokenizer import IncrementalDetokenizer
    from nanovllm_onnx.outputs import Logprob


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        prompt: str | None = None,
    ) -> None:
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples this is
        self.prompt = prompt
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        # Tokens whose K/V are in this sequence's cache slot.
        self.num_computed_tokens = 0
        # Prompt tokens whose K/V came from the prefix cache instead of the model.
        self.num_cached_tokens = 0
        self.slot: int | None = None
        self.block_hashes: list[int] = []  # hash of each full block, in order
        self.num_stored_blocks = 0  # leading full blocks already in the prefix store
        self.num_blocks = 0  # blocks of the KV budget this sequence holds
        # Per-request generator: the same seed gives the same tokens in any batch.
        seed = None if params.seed is None else params.seed + index
        self.generator: np.random.Generator | None = (
            np.random.default_rng(seed) if seed is not None else None
        )
        # Uniforms drawn for verification rows past a rejected draft token, handed back so
        # that output token m always uses the generator's m-th uniform: a seed gives the same
        # tokens with speculation or without (top of the stack = the next one).
        self.unused_uniforms: list[float] = []
        # Speculative decoding: tokens proposed for the next step (verified, never appended
        # unchecked), tokens whose K/V the draft model holds, and when to propose.
        self.draft_token_ids: list[int] = []
        self.num_draft_computed = 0
        # Running mean of accepted tokens per verification; it starts high, so a new sequence
        # pauses only after six rejections in a row.
        self.spec_accepted = 4.0
        self.spec_pause = 0  # steps left without proposals (acceptance was too low)
        self.logprobs: list[dict[int, Logprob]] = []
        # Prompt logprobs so far (vLLM's layout: None for the first prompt token).
        self.prompt_logprobs: list[dict[int, Logprob] | None] = [None]
        self.output_text = ""
        self.detokenizer: IncrementalDetokenizer | None = None  # set by the engine
        # Where the output is in its structured_outputs grammar (set by the engine). It has
        # consumed every output token, so a preempted sequence keeps it as it is.
        self.grammar: GrammarMatcher | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def next_uniform(self) -> float:
        """The next uniform of this sequence's seeded generator."""
        assert self.generator is not None
        return self.unused_uniforms.pop() if self.unused_uniforms else self.generator.random()
