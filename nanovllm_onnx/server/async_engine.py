"""The engine in one background thread that owns it; asyncio handlers talk to it by queues.

LLMEngine is not thread-safe, so only the engine thread touches it. Handlers put commands (add,
abort) on a thread-safe queue; the thread applies them between steps, steps, and hands each
request's outputs to that request's asyncio queue with call_soon_threadsafe. The event loop never
waits on inference, and nothing a request does can stop the thread. Should the thread die all
the same (a bug), every request it holds fails at once, new ones get 503, and `on_death` tells
the server to exit (as vLLM's EngineDeadError): a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nanovllm_onnx.engine.llm_engine import LLMEngine
from nanovllm_onnx.outputs import RequestOutput
from nanovllm_onnx.sampling_params import SamplingParams, StructuredOutputsParams
from nanovllm_onnx.server.metrics import ServerMetrics
from nanovllm_onnx.server.protocol import APIError, Prompt, bad_request, param_in, server_error

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


@dataclass
class ChatPrompt:
    """A conversation, rendered by the chat template in the engine thread (its tokenizer's)."""

    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None


@dataclass
class _Add:
    stream: RequestStream
    prompts: Sequence[Prompt | ChatPrompt]
    params: SamplingParams
    prompt_param: str  # the request field to name when a prompt is refused


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass(frozen=True)
class EngineStats:
    """The engine's totals and state after an iteration (made by the engine thread, read by the
    stats logger's: a frozen value, swapped whole)."""

    prompt_tokens: int = 0  # prompt tokens computed (not those found in the prefix cache)
    generation_tokens: int = 0
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0-1
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0


def stats_line(before: EngineStats, now: EngineStats, seconds: float) -> str:
    """vLLM's periodic engine line (its wording, so that what reads vLLM's logs reads these):
    the interval's average throughputs and prefix cache hit rate, the state at its end."""
    queries = now.prefix_queries - before.prefix_queries
    hits = now.prefix_hits - before.prefix_hits
    return (f"Avg prompt throughput: {(now.prompt_tokens - before.prompt_tokens) / seconds:.1f} "
            f"tokens/s, Avg generation throughput: "
            f"{(now.generation_tokens - before.generation_tokens) / seconds:.1f} tokens/s, "
            f"Running: {now.running} reqs, Waiting: {now.waiting} reqs, KV cache usage: "
            f"{100 * now.kv_cache_usage:.1f}%, Prefix cache hit rate: "
            f"{100 * hits / queries if queries else 0.0:.1f}%")


_STOP = object()
# What the engine thread sends a stream: the prompt token count once admitted, then
# (prompt index, output) pairs; or an error.
_Item = int | tuple[int, RequestOutput] | APIError


class EngineDeadError(RuntimeError):
    """The engine thread died: the server cannot go on."""


def _unavailable() -> APIError:
    return APIError(503, "the engine is not running", type="server_error", code="unavailable")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int, metrics: ServerMetrics,
                 on_death: Callable[[], None] | None = None,
                 log_stats_interval: float | None = None) -> None:
        """log_stats_interval: seconds between vLLM's engine stats lines (None: none)."""
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.on_death = on_death  # called by the dying engine thread, after failing requests
        self.died = False
        self._generated = 0  # tokens generated so far
        self.stats = self._engine_stats()  # after the engine thread's latest iteration
        self._stopping = threading.Event()
        self._stats_thread = None if log_stats_interval is None else threading.Thread(
            target=self._log_stats, args=(log_stats_interval,), name="stats", daemon=True)
        self._commands: queue.SimpleQueue[_Add | _Abort | object] = queue.SimpleQueue()
        # Held while a request is queued and while the dying thread drains the queue: no
        # request can be queued after the drain and wait forever.
        self._accepting = threading.Lock()
        # Engine-thread state: where each engine request's outputs go, and for each of its
        # sequences the tokens so far and when the latest came.
        self._routes: dict[str, tuple[RequestStream, int]] = {}
        self._progress: dict[str, list[tuple[int, float]]] = {}
        self._counted = (0,) * 7  # engine counters already added to the metrics
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        bm = engine.block_manager
        metrics.cache_config.info({  # vLLM's labels (the blocks are in CPU memory here)
            "block_size": str(bm.block_size), "num_gpu_blocks": str(bm.num_blocks),
            "cache_dtype": str(engine.kv_cache.dtype),
            "enable_prefix_caching": str(engine.config.enable_prefix_caching)})

    def start(self) -> None:
        self._thread.start()
        if self._stats_thread is not None:
            self._stats_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(_STOP)
        self._thread.join(timeout)

    def _log_stats(self, interval: float) -> None:
        """Every `interval` seconds a stats line, while the engine works and once after (the
        line that shows it idle), as vLLM logs them: on a clock of its own, so that a long
        idle time is not averaged into the next busy interval."""
        before, start, busy = self.stats, time.monotonic(), False
        while not self._stopping.wait(interval):
            now, end = self.stats, time.monotonic()
            active = now.running or now.waiting or now != before
            if active or busy:
                logger.info("%s", stats_line(before, now, end - start))
            before, start, busy = now, end, bool(active)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self.died

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def chat_template(self) -> str | None:
        return self.engine.model_config.chat_template

    async def compile_constraint(self, constraint: StructuredOutputsParams) -> None:
        """Compile a request's grammar off the engine thread (the engine then finds it
        cached): a slow one delays only its own request. Raises ValueError naming what is
        wrong with it."""
        await asyncio.to_thread(self.engine.structured.compiler.compile, constraint)

    async def tokenize(self, prompt: str | ChatPrompt, add_special_tokens: bool | None
                       ) -> tuple[list[int], list[str | None]]:
        """A prompt's token ids and their token strings, or a conversation's as its chat
        template renders it (add_special_tokens, None: yes for a prompt, no for a
        conversation, whose template writes them). Off the engine thread: the tokenizer and
        the template are only read. Raises ValueError naming what is wrong."""
        tokenizer = self.engine.tokenizer

        def run() -> tuple[list[int], list[str | None]]:
            if isinstance(prompt, str):
                ids = tokenizer.encode(prompt, add_special_tokens is not False)
            else:
                ids = tokenizer.encode(tokenizer.apply_chat_template(
                    prompt.messages, prompt.add_generation_prompt, prompt.tools),
                    bool(add_special_tokens))
            return ids, tokenizer.token_strings(ids)
        return await asyncio.to_thread(run)

    async def detokenize(self, ids: list[int]) -> str:
        """Token ids' text, special tokens kept. Raises ValueError for an id outside the
        vocabulary."""
        vocab = self.engine.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids must be in [0, {vocab}); got {bad[:5]}")
        return await asyncio.to_thread(self.engine.tokenizer.decode, ids, False)

    # ---- event loop side -------------------------------------------------------------------

    async def submit(self, request_id: str, prompts: Sequence[Prompt | ChatPrompt],
                     params: SamplingParams, prompt_param: str) -> RequestStream:
        """Queue a request (one engine request per prompt); return once the engine took it.
        Raises APIError: 400 for a bad prompt, 503 when too many requests wait."""
        needed = len(prompts) * params.n
        if needed > self.max_waiting:
            raise bad_request(f"the request asks for {needed} sequences; this server queues at "
                              f"most {self.max_waiting}", "n")
        stream = RequestStream(self, request_id, len(prompts))
        with self._accepting:
            if not self.is_alive():
                raise _unavailable()
            self._commands.put(_Add(stream, prompts, params, prompt_param))
        await stream.wait_admitted()
        return stream

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(_Abort(request_ids))

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._apply_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
        except Exception:  # a bug: nothing can be trusted to run on, so fail all and exit
            logger.critical("the engine thread died; failing every request", exc_info=True)
            self._die()

    def _die(self) -> None:
        with self._accepting:
            self.died = True
            queued = []
            while not self._commands.empty():
                queued.append(self._commands.get_nowait())
        dead = APIError(500, "the engine died while running this request; the server is "
                        "shutting down", type="server_error", code="engine_dead")
        for stream in {stream for stream, _ in self._routes.values()}:
            stream.deliver(dead)
        for command in queued:
            if isinstance(command, _Add):
                command.stream.deliver(_unavailable())
        self._routes.clear()
        if self.on_death is not None:
            self.on_death()

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one if block); False once told to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while command is not _STOP:
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self._abort(command.request_ids)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _add(self, command: _Add) -> None:
        engine, stream = self.engine, command.stream
        if len(engine.scheduler.waiting) + len(command.prompts) * command.params.n > \
                self.max_waiting:
            stream.deliver(APIError(
                503, "the server is overloaded: too many requests are waiting; retry later",
                type="server_error", code="overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)}))
            return
        added: list[str] = []
        try:
            for request_id, prompt in zip(stream.engine_ids, command.prompts):
                if isinstance(prompt, ChatPrompt):
                    prompt = engine.tokenizer.chat_prompt_ids(
                        prompt.messages, prompt.add_generation_prompt, prompt.tools)
                ids = engine.tokenize_prompt(prompt)
                _check_room(len(ids), command.params.max_tokens, engine.max_model_len)
                engine.add_request(request_id, ids, command.params)
                added.append(request_id)
        except Exception as e:  # all of the request's prompts run, or none
            engine.abort_request(added)
            if isinstance(e, APIError):
                stream.deliver(e)
            elif isinstance(e, ValueError):
                stream.deliver(bad_request(str(e), param_in(e) or command.prompt_param))
            else:
                logger.exception("request %s could not be added", stream.request_id)
                stream.deliver(server_error("the engine could not add the request"))
            return
        prompt_tokens = sum(len(engine.requests[r].prompt_token_ids) for r in added)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        for index, request_id in enumerate(added):
            self._routes[request_id] = (stream, index)
            self._progress[request_id] = [(0, 0.0)] * command.params.n
        stream.deliver(prompt_tokens)

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._routes.pop(request_id, None)
            self._progress.pop(request_id, None)
        try:
            self.engine.abort_request(request_ids)
        except Exception:  # keep the engine thread alive; these requests are gone anyway
            logger.exception("aborting requests %s failed", request_ids)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; failing its requests and carrying on")
            self._fail_step()
            return
        new_tokens = sampled = 0  # tokens, and sequences that sampled this step
        now = time.perf_counter()
        for output in outputs:
            request_id = output.request_id
            progress = self._progress.get(request_id, [(0, 0.0)] * len(output.outputs))
            for i, choice in enumerate(output.outputs):
                before, last_token_at = progress[i]
                if len(choice.token_ids) > before:
                    new_tokens += len(choice.token_ids) - before
                    sampled += 1
                    if before:  # as vLLM's: between a sequence's successive tokens
                        self.metrics.inter_token.observe(now - last_token_at)
                    progress[i] = (len(choice.token_ids), now)
            if output.finished:
                route = self._routes.pop(request_id, None)
                self._progress.pop(request_id, None)
            else:
                route = self._routes.get(request_id)
                self._progress[request_id] = progress
            if route is not None:
                stream, index = route
                stream.deliver((index, output))
        if sampled:
            self.metrics.generation_tokens.inc(new_tokens)
            self.metrics.batch_size.observe(sampled)
            self._generated += new_tokens

    def _fail_step(self) -> None:
        """Abort the requests of the failed step. If none was running, the step failed before
        its batch formed: fail every request, or the same failure would repeat forever."""
        failed = {seq.request_id for seq in self.engine.scheduler.running}
        for request_id in failed or set(self.engine.requests):
            route = self._routes.get(request_id)
            self._abort([request_id])
            if route is not None:
                route[0].deliver(server_error("the engine failed while running this request"))

    def _publish_stats(self) -> None:
        """The engine's state after this iteration into the metrics; its own running counts
        go in as what they added since the last time."""
        bm, m = self.engine.block_manager, self.metrics
        self.stats = stats = self._engine_stats()
        m.running.set(stats.running)
        m.waiting.set(stats.waiting)
        m.kv_cache_usage.set(stats.kv_cache_usage)
        m.prefix_cache_blocks.set(len(bm.cached))
        spec = self.engine.spec_decode_stats
        if spec is not None:
            m.spec_decode_acceptance_rate.set(spec.acceptance_rate)
            m.spec_decode_mean_accepted_length.set(spec.mean_accepted_length)
        counts = (stats.prefix_queries, stats.prefix_hits,
                  self.engine.scheduler.num_preemptions, self.engine.num_steps,
                  *((spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens)
                    if spec is not None else (0, 0, 0)))
        counters = (m.prefix_cache_queries, m.prefix_cache_hits, m.preemptions, m.steps,
                    m.spec_decode_num_drafts, m.spec_decode_num_draft_tokens,
                    m.spec_decode_num_accepted_tokens)
        for counter, now, before in zip(counters, counts, self._counted, strict=True):
            if now > before:
                counter.inc(now - before)
        self._counted = counts

    def _engine_stats(self) -> EngineStats:
        bm, scheduler = self.engine.block_manager, self.engine.scheduler
        return EngineStats(self.engine.num_prefill_tokens, self._generated,
                           len(scheduler.running), len(scheduler.waiting),
                           bm.num_seq_blocks / bm.num_blocks, bm.prefix_queries * bm.block_size,
                           bm.prefix_hits * bm.block_size)


def _check_room(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """vLLM's 400 for a max_tokens the context cannot hold (the offline API caps it instead,
    as vLLM's does)."""
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has "
            f"{prompt_tokens} input tokens ({max_tokens} > {max_model_len} - {prompt_tokens})",
            "max_tokens")


class RequestStream:
    """One HTTP request's engine requests (one per prompt), as seen from the event loop."""

    def __init__(self, engine: AsyncEngine, request_id: str, num_prompts: int) -> None:
        self._engine = engine
        self.request_id = request_id
        self.engine_ids = [f"{request_id}-{i}" for i in range(num_prompts)]
        self.outputs: list[RequestOutput | None] = [None] * num_prompts  # latest of each
        self.prompt_tokens = 0
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._start = time.perf_counter()
        self._first_token: float | None = None
        self._last_token = 0.0
        self._admitted = self._failed = self._closed = False

    def deliver(self, item: _Item) -> None:
        """Called by the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: the server is shutting down

    async def wait_admitted(self) -> None:
        """Until the engine takes the request; on refusal or cancellation the stream closes."""
        try:
            item = await self._queue.get()
            if isinstance(item, APIError):
                raise item
        except BaseException:
            self.close()
            raise
        assert isinstance(item, int)
        self.prompt_tokens = item
        self._admitted = True

    async def updates(self) -> AsyncIterator[list[RequestOutput | None]]:
        """The latest output of every prompt after each change, until all are finished.
        Raises APIError if the engine failed the request."""
        while not self.finished:
            self._take(await self._queue.get())
            while not self._queue.empty():  # outputs are cumulative: skip to the newest
                self._take(self._queue.get_nowait())
            yield self.outputs

    async def final(self) -> list[RequestOutput]:
        async for _ in self.updates():
            pass
        return [out for out in self.outputs if out is not None]

    def _take(self, item: _Item) -> None:
        if isinstance(item, APIError):
            self._failed = True
            raise item
        assert isinstance(item, tuple)
        index, output = item
        self._last_token = time.perf_counter()
        if self._first_token is None:
            self._first_token = self._last_token
        self.outputs[index] = output
        self.finished = all(out is not None and out.finished for out in self.outputs)

    def close(self) -> None:
        """Abort whatever still runs (the client left or the request failed); then log the
        request and record its metrics. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self._engine.abort(self.engine_ids)
        if not self._admitted:
            return  # refused: the error response is logged instead
        choices = [c for out in self.outputs if out is not None for c in out.outputs]
        if self._failed:
            reasons = ["error"]
        elif not self.finished:
            reasons = ["abort"]
        else:
            reasons = [c.finish_reason or "abort" for c in choices]
        metrics = self._engine.metrics
        for reason in reasons:
            metrics.finished(reason)
        total = time.perf_counter() - self._start
        metrics.e2e.observe(total)
        completion_tokens = sum(len(c.token_ids) for c in choices)
        metrics.request_prompt_tokens.observe(self.prompt_tokens)
        metrics.request_generation_tokens.observe(completion_tokens)
        ttft = "-"
        if self._first_token is not None:
            metrics.ttft.observe(self._first_token - self._start)
            ttft = f"{self._first_token - self._start:.3f}s"
            longest = max(len(c.token_ids) for c in choices)
            if longest > 1:
                metrics.time_per_output_token.observe(
                    (self._last_token - self._first_token) / (longest - 1))
        logger.info("%s: prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs finish=%s",
                    self.request_id, self.prompt_tokens, completion_tokens, ttft, total,
                    ",".join(sorted(set(reasons))))
