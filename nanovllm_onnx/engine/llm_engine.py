"""The engine: requests in, one batched model call per step, tokens and text out."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from itertools import count

import numpy as np

from nanovllm_onnx.config import KV_CACHE_DTYPES, EngineConfig, ModelConfig, SpeculativeConfig
from nanovllm_onnx.convert.converter import resolve_model
from nanovllm_onnx.engine.block_manager import BlockManager
from nanovllm_onnx.engine.sampler import Sampler, log_softmax, logprob_dict
from nanovllm_onnx.engine.scheduler import Scheduler
from nanovllm_onnx.engine.sequence import Sequence
from nanovllm_onnx.engine.speculative import (
    SpecDecodeStats,
    VerifyRow,
    accepted_run,
    give_back_uniforms,
    make_speculator,
    update_acceptance,
)
from nanovllm_onnx.engine.structured import GrammarCompiler, StructuredOutputs
from nanovllm_onnx.engine.tokenizer import IncrementalDetokenizer, TextTokenizer
from nanovllm_onnx.kernels import KEY_TILE
from nanovllm_onnx.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm_onnx.runner.kv_cache import KVCache
from nanovllm_onnx.runner.model_runner import ModelRunner
from nanovllm_onnx.runner.optimum_runner import OptimumRunner
from nanovllm_onnx.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096
SLOT_ALIGN = 256  # slot capacity in tokens, rounded so slots start on whole pages


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    pending_samples: list[Sequence]  # n > 1: siblings admitted once the first has its prefill


def context_limit(mc: ModelConfig, max_model_len: int | None) -> int:
    """The longest sequence the engine runs this model at: its context, or its sliding window
    where that is shorter. The engine has no sliding-window attention; up to the window full
    attention is the same, past it not, so it stops there (vLLM's disable_sliding_window)."""
    limit, what = mc.max_position_embeddings, "context"
    if mc.sliding_window is not None and mc.sliding_window < limit:
        limit, what = mc.sliding_window, "sliding window"
        if max_model_len is None and limit < DEFAULT_MAX_MODEL_LEN:
            logger.warning("the model attends within a sliding window of %d tokens, which this "
                           "engine does not implement: max_model_len capped at %d (its context "
                           "is %d)", limit, limit, mc.max_position_embeddings)
    if max_model_len is not None and max_model_len > limit:
        detail = (": this engine has no sliding-window attention, and past the window full "
                  "attention is not the model's" if what == "sliding window" else "")
        raise ValueError(f"max_model_len={max_model_len} is longer than the model's {what} "
                         f"({limit} tokens){detail}")
    return limit


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **engine_args: object) -> None:
        cfg = config if config is not None else EngineConfig(**engine_args)  # type: ignore[arg-type]
        if (cfg.speculative_config is not None and
                SpeculativeConfig.from_dict(cfg.speculative_config).method == "draft_model"):
            # The target's and the draft's sessions alternate all through a step: threads
            # spinning after one's run hold the cores the other needs (fp32 + int4 draft on A,
            # loaded 2-core machine: 1.62x with spinning, 2.03x without).
            cfg = replace(cfg, intra_op_spinning=False)
        self.config = cfg
        model_dir = resolve_model(cfg.model, cfg.weights)
        self.model_config = mc = ModelConfig.load(model_dir)
        self.tokenizer = TextTokenizer(model_dir, mc)
        limit = context_limit(mc, cfg.max_model_len)
        self.max_model_len = cfg.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN)
        own_graph = mc.runner != "optimum"
        # fp16 halves the cache's memory and the bytes each decode reads, which bound
        # attention on a batch of long contexts (int8 halves them again); an Optimum export
        # keeps fp32 in its slots.
        kv_dtype = np.dtype(KV_CACHE_DTYPES.get(cfg.kv_cache_dtype,
                                                "float16" if own_graph else "float32"))
        if kv_dtype == np.int8 and not own_graph:
            raise ValueError("kv_cache_dtype=int8 needs a model converted by this engine; an "
                             "Optimum export runs its own attention on float caches (use auto, "
                             "fp16 or fp32)")
        block_bytes = cfg.block_size * mc.kv_bytes_per_token(kv_dtype)
        num_blocks = int(cfg.kv_cache_memory_gib * 2**30) // block_bytes
        blocks_per_seq = -(-self.max_model_len // cfg.block_size)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"kv_cache_memory_gib={cfg.kv_cache_memory_gib} holds {num_blocks * cfg.block_size}"
                f" tokens, fewer than one sequence of max_model_len={self.max_model_len}; raise "
                "kv_cache_memory_gib or lower max_model_len"
            )
        logger.info("KV cache: %.2f GiB = %d tokens (%d blocks of %d); %.1f sequences of "
                    "max_model_len=%d at once, up to max_num_seqs=%d", cfg.kv_cache_memory_gib,
                    num_blocks * cfg.block_size, num_blocks, cfg.block_size,
                    num_blocks / blocks_per_seq, self.max_model_len, cfg.max_num_seqs)
        # Whole pages per slot, or the model's context rounded up to whole key tiles.
        capacity = min(-(-self.max_model_len // SLOT_ALIGN) * SLOT_ALIGN,
                       -(-limit // KEY_TILE) * KEY_TILE)
        self.kv_cache = KVCache(mc, cfg.max_num_seqs, capacity, num_blocks, cfg.block_size,
                                tiled_keys=own_graph, dtype=kv_dtype)
        runner_cls = ModelRunner if own_graph else OptimumRunner
        self.runner = runner_cls(model_dir, mc, cfg, self.kv_cache)
        self.speculator = make_speculator(cfg, mc, self.tokenizer.tokenizer.get_vocab(),
                                          capacity, kv_dtype)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.max_num_seqs,
                                          cfg.enable_prefix_caching,
                                          release_slot=self._release_slot)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs,
                                   cfg.max_num_batched_tokens)
        # The sampler splits a large batch over as many threads as ONNX Runtime's pool (0: its
        # default, one per core), idle while it samples unless they spin (they then hold the
        # cores). 1B, 32 rows at temperature 1.0, quiet, 2 threads: 8.2-9.2 -> 5.2-5.8 ms a
        # step without spinning; with it 8.7-9.1 -> 9.0-9.3 ms, no gain.
        threads = cfg.intra_op_num_threads or os.cpu_count() or 1
        self.sampler = Sampler(mc.eos_token_ids, 1 if cfg.intra_op_spinning else threads)
        self.structured = StructuredOutputs(GrammarCompiler(
            self.tokenizer.tokenizer.to_str(), mc.vocab_size, mc.eos_token_ids))
        self.requests: dict[str, Request] = {}
        self._request_ids = count()
        self.num_steps = 0
        self.num_prefill_tokens = 0  # prompt tokens the model computed (not from the cache)

    def _release_slot(self, slot: int) -> None:
        self.kv_cache.release_slot(slot)
        if self.speculator is not None:
            self.speculator.release_slot(slot)

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        return self.speculator.stats if self.speculator is not None else None

    # ---- requests -------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return str(next(self._request_ids))

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context length."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}); "
                                 f"got {bad[:5]}")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt is {len(ids)} tokens, which leaves no room to "
                             f"generate within max_model_len={self.max_model_len}")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        vocab = self.model_config.vocab_size
        for field in ("stop_token_ids", "logit_bias"):
            bad = [t for t in getattr(params, field) or () if not 0 <= int(t) < vocab]
            if bad:
                raise ValueError(f"SamplingParams.{field} has token ids outside the vocabulary "
                                 f"[0, {vocab}): {bad[:5]}")
        ids = self.tokenize_prompt(prompt)
        room = self.max_model_len - len(ids)
        if params.max_tokens is None or params.max_tokens > room:
            params = replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
        text = prompt if isinstance(prompt, str) else None
        seqs = [Sequence(request_id, ids, params, index=i, prompt=text) for i in range(params.n)]
        for seq in seqs:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            if params.structured_outputs is not None:  # compiled once, then cached
                seq.grammar = self.structured.compiler.matcher(params.structured_outputs)
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, seqs[1:])
        self.scheduler.add(seqs[0])

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- stepping -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batched model call; return the requests that got new tokens."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        step, copies = self.scheduler.schedule()
        if not step.seqs:
            return []
        self.num_steps += 1
        self.kv_cache.copy_in(copies.copy_in)
        rows: list[Sequence | VerifyRow] = []  # what the sampler sees for each sampled row
        for i, seq in enumerate(step.seqs):
            num_samples = step.num_samples(i)
            rows.extend([seq] if num_samples == 1 else
                        [VerifyRow(seq, j) for j in range(num_samples)])
        # The grammar masks are computed while the model runs.
        masks = self.structured.start_masks(rows)
        logits = self.runner.run(step)
        sample_rows, row = [], 0
        for i, seq in enumerate(step.seqs):
            positions = step.logit_positions(i)
            num_samples = step.num_samples(i)
            num_prompt = len(positions) - num_samples
            if num_prompt:
                self._add_prompt_logprobs(seq, positions[:num_prompt],
                                          logits[row:row + num_prompt])
            row += len(positions)
            sample_rows.extend(range(row - num_samples, row))
        if len(sample_rows) < len(logits):  # some rows were prompt logprobs only
            logits = logits[sample_rows]
        dead_ends: set[Sequence] = set()
        if masks is not None:
            dead = masks.apply(logits)
            # Their grammar admits no token: they end instead of taking what is drawn here
            # (a verification's sequence ends without the tokens of this step).
            dead_ends = {rows[i].seq if isinstance(rows[i], VerifyRow) else rows[i]
                         for i in dead}
            logits[dead] = 0.0
        tokens, logprobs = self.sampler(logits, rows) if rows else ([], [])
        emitted: list[tuple[Sequence, list[int], list[dict[int, float] | None]]] = []
        row = 0
        for i, (seq, n) in enumerate(zip(step.seqs, step.num_tokens)):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.num_prefill_tokens += min(n, seq.num_prompt_tokens - seq.num_computed_tokens)
            num_samples = step.num_samples(i)
            num_emitted = self._verify(seq, tokens[row:row + num_samples],
                                       rows[row:row + num_samples]) if num_samples else 0
            if num_samples:
                emitted.append((seq, tokens[row:row + num_emitted].tolist(),
                                logprobs[row:row + num_emitted]))
                row += num_samples
            # Positions of rejected draft tokens stay in the slot, to be overwritten.
            seq.num_computed_tokens += n - (num_samples - num_emitted)
            self.block_manager.on_computed(seq, copies)
            if num_samples > 1:
                self.block_manager.release_rejected(seq)
                seq.draft_token_ids = []
        self.kv_cache.copy_out(copies.copy_out)
        self.kv_cache.release_store_blocks(self.block_manager.take_evicted_store_blocks())
        touched: dict[str, Request] = {}
        for seq, new_tokens, new_logprobs in emitted:
            request = self.requests[seq.request_id]
            if seq in dead_ends:
                self._finish(seq, "error", "grammar dead end: "
                             f"{seq.grammar.error or 'the grammar admits no token here'}")
                new_tokens = []
            for token, lp in zip(new_tokens, new_logprobs):
                self._append_token(seq, token, lp)
                if seq.is_finished:  # a stop inside an accepted run cuts it there
                    break
            touched[seq.request_id] = request
            if request.pending_samples and seq.index == 0:
                # The prompt is computed and cached: its siblings now reuse it.
                for sibling in reversed(request.pending_samples):
                    self.scheduler.waiting.appendleft(sibling)
                request.pending_samples = []
        outputs = []
        for request in touched.values():
            output = self._request_output(request)
            if output.finished:
                del self.requests[request.request_id]
            outputs.append(output)
        return outputs

    def _verify(self, seq: Sequence, sampled: np.ndarray,
                rows: list[Sequence | VerifyRow]) -> int:
        """How many of the sampled tokens the sequence takes: all of a plain decode's one; of a
        verification, the accepted drafts and the token after them. Counts the acceptance."""
        drafts = seq.draft_token_ids
        if not drafts:
            return 1
        num_emitted = accepted_run(drafts, sampled.tolist())
        give_back_uniforms(rows[num_emitted:])  # type: ignore[arg-type]
        stats = self.speculator.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += len(drafts)
        stats.num_accepted_tokens += num_emitted - 1
        update_acceptance(seq, num_emitted - 1)
        return num_emitted

    def _add_prompt_logprobs(self, seq: Sequence, positions: list[int],
                             logits: np.ndarray) -> None:
        """Logprob of each prompt token after `positions` (plus the top prompt_logprobs)."""
        start = seq.num_computed_tokens
        for p, row in zip(positions, log_softmax(logits)):
            token = seq.token_ids[start + p + 1]
            top = logprob_dict(row, seq.params.prompt_logprobs or 0, token)
            seq.prompt_logprobs.append(self._logprobs(top))

    def _logprobs(self, logprobs: dict[int, float]) -> dict[int, Logprob]:
        return {t: Logprob(v, decoded_token=self.tokenizer.decode([t], False))
                for t, v in logprobs.items()}

    def _append_token(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> None:
        p = seq.params
        seq.append_token(token)
        if logprobs is not None:
            seq.logprobs.append(self._logprobs(logprobs))
        if seq.grammar is not None and not seq.grammar.accept(token):
            # The mask admits only what the grammar takes; this is a bug, not the user's.
            self._finish(seq, "error", f"grammar rejected token {token}: {seq.grammar.error}")
            return
        may_stop = seq.num_output_tokens >= p.min_tokens
        stop_token: int | None = None
        if may_stop and token in p.stop_token_ids:
            stop_token = token
        elif may_stop and not p.ignore_eos and token in self.model_config.eos_token_ids:
            stop_token = token
        # As vLLM: the text of the token that stopped the sequence is left out unless asked.
        if stop_token is None or p.include_stop_str_in_output:
            new_text = seq.detokenizer.step(token)
            seq.output_text += new_text
        if stop_token is not None:
            # vLLM reports the id for stop_token_ids and None for EOS.
            self._finish(seq, "stop", token if token in p.stop_token_ids else None,
                         drop_last=not p.include_stop_str_in_output)
            return
        if p.stop_strings and may_stop and self._stop_string_match(seq, len(new_text)):
            return
        if seq.num_output_tokens >= (p.max_tokens or 0):
            self._finish(seq, "length", None)
        elif seq.grammar is not None and seq.grammar.is_stopped:
            # The output is complete: only EOS could follow, so end here, a step earlier.
            error = seq.grammar.error
            self._finish(seq, "error" if error else "stop", error and f"grammar error: {error}")

    def _stop_string_match(self, seq: Sequence, new_chars: int) -> bool:
        """Finish at the first stop string the new text completes; cut the text as vLLM does."""
        text = seq.output_text
        for stop in seq.params.stop_strings:
            # Only where the new text could complete a match: earlier text was checked.
            index = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
            if index != -1:
                end = index + len(stop) if seq.params.include_stop_str_in_output else index
                seq.output_text = text[:end]
                self._finish(seq, "stop", stop, flush_text=False)
                return True
        return False

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None,
                flush_text: bool = True, drop_last: bool = False) -> None:
        """drop_last: the last token (a stop token) is left out of the text."""
        if flush_text:
            # Bytes the incremental detokenizer still holds (an unfinished character) are
            # emitted now, as a full decode would.
            ids = seq.output_token_ids
            if drop_last:
                ids = ids[:-1]
            seq.output_text = self.tokenizer.decode(ids, seq.params.skip_special_tokens)
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _request_output(self, request: Request) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=seq.index, text=seq.output_text, token_ids=seq.output_token_ids,
                logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            )
            for seq in request.seqs
        ]
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, outputs=outputs,
            prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None
            else None,
            finished=all(seq.is_finished for seq in request.seqs),
            num_cached_tokens=request.seqs[0].num_cached_tokens,
        )
