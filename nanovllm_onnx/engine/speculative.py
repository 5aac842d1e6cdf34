"""Speculative decoding: propose a few tokens per decoding sequence, verify them in the step.

Proposals come from prompt lookup (the n-gram method: the tokens that followed the latest
earlier occurrence of the sequence's last n tokens) or from a draft model's greedy choices.
Either way a proposal is deterministic, i.e. a one-hot draft distribution, and for that the
standard speculative-sampling rule (accept draft d with probability min(1, p(d) / q(d)) = p(d),
else draw from p with d removed) is the same as drawing a token x ~ p at each verified position
and accepting while x equals the draft: the first x that differs is the correction, and after a
fully accepted run the last row's x is the bonus token. So the engine's sampler, applied to each
verified position as to a plain decode row (see VerifyRow), does the verification: greedy rows
accept the longest matching prefix plus one; sampled rows keep the target distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanovllm_onnx.config import EngineConfig, ModelConfig, SpeculativeConfig
from nanovllm_onnx.convert.converter import resolve_model
from nanovllm_onnx.engine.sequence import Sequence
from nanovllm_onnx.runner.kv_cache import KVCache
from nanovllm_onnx.runner.model_runner import ModelRunner, StepInput

# A sequence whose running mean of accepted tokens per verification falls below this stops
# proposing for PAUSE_STEPS steps, then tries again: a verification costs a fraction of a
# step, so even one accepted token in two pays, and acceptance comes in bursts (a model
# quoting, then rephrasing, then quoting again): only a long run of rejections pauses.
MIN_ACCEPTED = 0.5
PAUSE_STEPS = 8
ACCEPTANCE_DECAY = 0.7  # weight of the past in the running mean


@dataclass
class SpecDecodeStats:
    """Counters with vLLM's meaning (vllm:spec_decode_num_drafts and so on)."""

    num_drafts: int = 0  # verifications of a proposal (one sequence, one step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens each verification emits: the accepted drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class VerifyRow:
    """A sequence as it would be with its first `num_drafts` draft tokens accepted: the sampler
    treats the logits that verify the next draft token exactly as a plain decode row of that
    sequence (penalties, min_tokens, logit_bias see the drafts before it)."""

    def __init__(self, seq: Sequence, num_drafts: int) -> None:
        self.seq = seq
        self.params = seq.params
        self.generator = seq.generator
        self.num_drafts = num_drafts
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.grammar = seq.grammar  # its mask: the grammar's after the drafts before it
        self.num_output_tokens = seq.num_output_tokens + num_drafts
        self.uniform: float | None = None  # drawn for this row, if it was sampled

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.seq.draft_token_ids[:self.num_drafts]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def next_uniform(self) -> float:
        self.uniform = self.seq.next_uniform()
        return self.uniform


def accepted_run(drafts: list[int], sampled: list[int]) -> int:
    """How many tokens a verification emits: the sampled tokens up to and including the first
    that differs from its draft (len(sampled) = len(drafts) + 1)."""
    n = 0
    while n < len(drafts) and sampled[n] == drafts[n]:
        n += 1
    return n + 1


def give_back_uniforms(rows: list[VerifyRow]) -> None:
    """Uniforms of rows past the emitted tokens go back to their sequence, latest deepest."""
    for row in reversed(rows):
        if row.uniform is not None:
            row.seq.unused_uniforms.append(row.uniform)


def update_acceptance(seq: Sequence, accepted: int) -> None:
    seq.spec_accepted = ACCEPTANCE_DECAY * seq.spec_accepted + (1 - ACCEPTANCE_DECAY) * accepted
    if seq.spec_accepted < MIN_ACCEPTED:
        seq.spec_pause = PAUSE_STEPS
        seq.spec_accepted = MIN_ACCEPTED  # after the pause, one more rejection pauses again


class Speculator:
    """Chooses which running sequences propose, and how many tokens."""

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self.stats = SpecDecodeStats()

    def propose(self, running: list[Sequence]) -> None:
        """Set each running sequence's draft_token_ids for the next step."""
        eligible = []
        for seq in running:
            seq.draft_token_ids = []
            # The draft model's cache holds what the target verified (or, for a sequence not
            # scheduled last step, at least what the target computed); the rest is redone.
            seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
            if seq.num_uncomputed_tokens != 1:
                continue  # still in prefill
            if seq.spec_pause:
                seq.spec_pause -= 1
                continue
            # The step emits at most k + 1 tokens: never past max_tokens (nor max_model_len,
            # which bounds max_tokens).
            k = min(self.cfg.num_speculative_tokens,
                    (seq.params.max_tokens or 0) - seq.num_output_tokens - 1)
            if k > 0:
                eligible.append((seq, k))
        if eligible and len(running) <= self.cfg.disable_by_batch_size:
            self._propose(eligible)
            for seq, _ in eligible:
                if seq.grammar is not None and seq.draft_token_ids:
                    # The target's sample is masked: a draft the grammar forbids is rejected
                    # anyway, so the verification stops before it.
                    seq.draft_token_ids = seq.draft_token_ids[
                        :seq.grammar.validate(seq.draft_token_ids)]

    def _propose(self, seqs: list[tuple[Sequence, int]]) -> None:
        raise NotImplementedError

    def release_slot(self, slot: int) -> None:
        """A target slot was freed (nothing to do without a draft model's cache)."""


class NgramSpeculator(Speculator):
    def _propose(self, seqs: list[tuple[Sequence, int]]) -> None:
        for seq, k in seqs:
            seq.draft_token_ids = self.lookup(seq.token_ids, k)

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        """The tokens after the latest earlier occurrence of the longest suffix of
        prompt_lookup_min..prompt_lookup_max tokens that occurred before (vLLM takes the
        earliest; the latest follows the text being copied or edited now): up to k after a
        suffix of prompt_lookup_max tokens, up to k n / prompt_lookup_max (at least 1) after a
        shorter one of n. A shorter match predicts less, and every verified row costs: on
        workload C, 4-token matches had 6.8 of 8 drafts accepted on average, 2-token matches
        1.9, half of them none."""
        tokens = np.asarray(token_ids)
        # Earlier occurrences end where the last token occurs again (few places): extend each
        # backwards instead of comparing every window of the sequence (2-5x less time a step).
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        if not ends.size:
            return []
        matched = np.ones(ends.size, dtype=np.int64)  # suffix tokens each occurrence matches
        still = np.ones(ends.size, dtype=bool)
        for j in range(1, min(self.cfg.prompt_lookup_max, len(tokens) - 1)):
            before = ends - j
            still &= before >= 0
            still[still] = tokens[before[still]] == tokens[-1 - j]
            matched += still
        for n in range(self.cfg.prompt_lookup_max, self.cfg.prompt_lookup_min - 1, -1):
            hits = ends[matched >= n]
            if hits.size:
                k = max(1, k * n // self.cfg.prompt_lookup_max)
                # The latest with k tokens after it (one near the end proposes fewer).
                full = hits[hits + 1 + k <= len(tokens)]
                start = int(full[-1] if full.size else hits[-1]) + 1
                return tokens[start:start + k].tolist()
        return []


class DraftStep(StepInput):
    """A step of the draft model: each sequence's tokens from where its draft cache ends,
    then the drafts proposed so far; logits at the last one."""

    def start(self, i: int) -> int:
        return self.seqs[i].num_draft_computed

    def samples(self, i: int) -> bool:
        return True

    def num_samples(self, i: int) -> int:
        return 1

    def logit_positions(self, i: int) -> list[int]:
        return [self.num_tokens[i] - 1]


class DraftModelSpeculator(Speculator):
    """A smaller model with the same vocabulary (or the target in another weight format) runs
    its own KV cache, in the target's slots, and proposes its greedy tokens one call at a time,
    batched over the proposing sequences."""

    def __init__(self, cfg: SpeculativeConfig, engine_cfg: EngineConfig, target: ModelConfig,
                 target_vocab: dict[str, int], capacity: int, kv_dtype: np.dtype) -> None:
        super().__init__(cfg)
        from nanovllm_onnx.engine.tokenizer import TextTokenizer

        model_dir = resolve_model(cfg.model if cfg.model is not None else engine_cfg.model,
                                  cfg.weights)
        self.model_config = mc = ModelConfig.load(model_dir)
        if mc.runner != "slots":
            raise ValueError(f"speculative draft model {cfg.model}: an Optimum export cannot be "
                             "a draft; convert the checkpoint instead")
        vocab = TextTokenizer(model_dir, mc).tokenizer.get_vocab()
        if mc.vocab_size != target.vocab_size or vocab != target_vocab:
            raise ValueError(
                f"speculative draft model {cfg.model} has a different tokenizer or vocabulary "
                f"({mc.vocab_size} ids, {len(vocab)} tokens) from the target's "
                f"({target.vocab_size} ids, {len(target_vocab)} tokens); a draft must share "
                "the target's tokenizer")
        # The draft's own cache: one slot per target slot, no prefix store.
        self.kv_cache = KVCache(mc, engine_cfg.max_num_seqs, capacity, 1, engine_cfg.block_size,
                                tiled_keys=True, dtype=kv_dtype)
        self.runner = ModelRunner(Path(model_dir), mc, engine_cfg, self.kv_cache)

    def release_slot(self, slot: int) -> None:
        self.kv_cache.release_slot(slot)

    def _propose(self, seqs: list[tuple[Sequence, int]]) -> None:
        for seq, _ in seqs:
            seq.draft_token_ids = []
        active = seqs
        while active:
            step = DraftStep([s for s, _ in active],
                             [len(s) + len(s.draft_token_ids) - s.num_draft_computed
                              for s, _ in active])
            logits = self.runner.run(step)
            for (seq, _), n, token in zip(active, step.num_tokens, logits.argmax(axis=1)):
                seq.num_draft_computed += n
                seq.draft_token_ids.append(int(token))
            active = [(s, k) for s, k in active if len(s.draft_token_ids) < k]


def make_speculator(engine_cfg: EngineConfig, target: ModelConfig, target_vocab: dict[str, int],
                    capacity: int, kv_dtype: np.dtype) -> Speculator | None:
    if engine_cfg.speculative_config is None:
        return None
    cfg = SpeculativeConfig.from_dict(engine_cfg.speculative_config)
    if cfg.method == "ngram":
        return NgramSpeculator(cfg)
    return DraftModelSpeculator(cfg, engine_cfg, target, target_vocab, capacity, kv_dtype)
