"""OpenAI response bodies and server-sent event streams, built from engine outputs."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nanovllm_onnx.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm_onnx.sampling_params import SamplingParams
from nanovllm_onnx.server.async_engine import RequestStream
from nanovllm_onnx.server.protocol import APIError, server_error
from nanovllm_onnx.server.tool_parsers import ToolCall, ToolParser, required_calls

logger = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps to the same
DONE = "data: [DONE]\n\n"


@dataclass
class ResponseMeta:
    id: str
    created: int
    model: str
    chat: bool  # chat.completion or text_completion


@dataclass
class Piece:
    """A choice's text and tokens since the previous chunk (or all of them)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text_offset: int  # characters of this choice's decoded tokens before this piece
    finish_reason: str | None
    stop_reason: int | str | None


def _choices(outputs: Sequence[RequestOutput | None], n: int
             ) -> Iterator[tuple[int, CompletionOutput]]:
    """(choice index, output) of every sample; prompt p's samples are p*n ... p*n+n-1."""
    for p, out in enumerate(outputs):
        if out is not None:
            for c in out.outputs:
                yield p * n + c.index, c


def _token_text(lp: Logprob) -> str:
    return lp.decoded_token or ""


class DeltaTracker:
    """What each choice adds since the last chunk. Text that could be the start of a stop string
    is held back until that is resolved (as vLLM does), so streamed text equals final text."""

    def __init__(self, params: SamplingParams) -> None:
        self.n = params.n
        self.hold = max(map(len, params.stop_strings), default=1) - 1
        self.want_tokens = params.logprobs is not None  # tokens only matter for logprobs
        self._chars: defaultdict[int, int] = defaultdict(int)
        self._tokens: defaultdict[int, int] = defaultdict(int)
        self._token_chars: defaultdict[int, int] = defaultdict(int)
        self._done: set[int] = set()

    def pieces(self, outputs: Sequence[RequestOutput | None]) -> list[Piece]:
        pieces = []
        for index, c in _choices(outputs, self.n):
            if index in self._done:
                continue
            finished = c.finish_reason is not None
            sent, start = self._chars[index], self._tokens[index]
            end = len(c.text) if finished else max(sent, len(c.text) - self.hold)
            num_tokens = len(c.token_ids)
            new_tokens = self.want_tokens and num_tokens > start
            if end == sent and not new_tokens and not finished:
                continue
            # The engine's logprobs list may grow meanwhile: take as many as token_ids.
            logprobs = c.logprobs[start:num_tokens] if c.logprobs is not None else None
            token_ids = c.token_ids[start:]
            pieces.append(Piece(index, c.text[sent:end], token_ids, logprobs,
                                self._token_chars[index], c.finish_reason, c.stop_reason))
            self._chars[index], self._tokens[index] = end, num_tokens
            if logprobs:
                self._token_chars[index] += sum(
                    len(_token_text(lp[t])) for t, lp in zip(token_ids, logprobs))
            if finished:
                self._done.add(index)
        return pieces


def final_pieces(outputs: Sequence[RequestOutput | None], n: int) -> list[Piece]:
    return [Piece(i, c.text, c.token_ids,
                  None if c.logprobs is None else c.logprobs[:len(c.token_ids)], 0,
                  c.finish_reason, c.stop_reason) for i, c in _choices(outputs, n)]


def usage(prompt_tokens: int, outputs: Sequence[RequestOutput | None]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for _, c in _choices(outputs, 1))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def completion_logprobs(piece: Piece) -> dict[str, Any] | None:
    """Legacy completions format; top_logprobs holds the top ones and the sampled token."""
    if piece.logprobs is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = piece.text_offset
    for token, entries in zip(piece.token_ids, piece.logprobs):
        text = _token_text(entries[token])
        tokens.append(text)
        token_logprobs.append(_logprob(entries[token].logprob))
        top.append({_token_text(lp): _logprob(lp.logprob) for lp in entries.values()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def _chat_token(lp: Logprob) -> dict[str, Any]:
    text = _token_text(lp)
    return {"token": text, "logprob": _logprob(lp.logprob), "bytes": list(text.encode())}


def chat_logprobs(piece: Piece, num_top: int) -> dict[str, Any] | None:
    """Chat format; top_logprobs holds the num_top most likely tokens, best first."""
    if piece.logprobs is None:
        return None
    content = []
    for token, entries in zip(piece.token_ids, piece.logprobs):
        best = sorted(entries.values(), key=lambda lp: -lp.logprob)[:num_top]
        content.append({**_chat_token(entries[token]),
                        "top_logprobs": [_chat_token(lp) for lp in best]})
    return {"content": content}


class ToolCalls:
    """How a chat request with tools reads its outputs: mode "auto" (the parser finds calls in
    free text), "required" (a JSON array of calls) or "named" (the output is the arguments of
    that function). Streamed, content is sent as it comes until a call may begin; the calls go
    out whole once the choice ends."""

    def __init__(self, mode: str, parser: ToolParser, name: str | None = None,
                 parallel: bool = True) -> None:
        self.mode, self.parser, self.name, self.parallel = mode, parser, name, parallel
        self._text: defaultdict[int, str] = defaultdict(str)
        self._sent: defaultdict[int, int] = defaultdict(int)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.mode == "auto":
            content, calls = self.parser.extract(text)
            return content, calls if self.parallel else calls[:1]
        if self.mode == "required":
            calls = required_calls(text)
        else:
            try:
                calls = [ToolCall(self.name, text)] if isinstance(json.loads(text), dict) else []
            except json.JSONDecodeError:
                calls = []
        return (None, calls) if calls else (text, [])

    def message(self, piece: Piece) -> tuple[dict[str, Any], str | None]:
        content, calls = self.extract(piece.text)
        message = {"role": "assistant", "content": content,
                   "tool_calls": [c.body() for c in calls]}
        return message, "tool_calls" if calls else piece.finish_reason

    def delta(self, piece: Piece) -> tuple[dict[str, Any], str | None]:
        i = piece.index
        text = self._text[i] = self._text[i] + piece.text
        sent = self._sent[i]
        content_end = self.parser.content_end(text) if self.mode == "auto" else 0
        if piece.finish_reason is None:
            self._sent[i] = max(sent, content_end)
            return ({"content": text[sent:content_end]} if content_end > sent else {}), None
        _, calls = self.extract(text)
        if not calls:
            return ({"content": text[sent:]} if len(text) > sent else {}), piece.finish_reason
        delta: dict[str, Any] = {"tool_calls": [c.body(k) for k, c in enumerate(calls)]}
        if content_end > sent:
            delta["content"] = text[sent:content_end]
        return delta, "tool_calls"


def _choice(meta: ResponseMeta, piece: Piece, params: SamplingParams, streaming: bool,
            tools: ToolCalls | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": piece.index}
    finish_reason = piece.finish_reason
    if not meta.chat:
        choice["text"] = piece.text
        choice["logprobs"] = completion_logprobs(piece)
    else:
        if streaming and tools is not None:
            choice["delta"], finish_reason = tools.delta(piece)
        elif streaming:
            choice["delta"] = {"content": piece.text} if piece.text else {}
        elif tools is not None:
            choice["message"], finish_reason = tools.message(piece)
        else:
            choice["message"] = {"role": "assistant", "content": piece.text}
        choice["logprobs"] = chat_logprobs(piece, params.logprobs or 0)
    choice["finish_reason"] = finish_reason
    choice["stop_reason"] = piece.stop_reason  # vLLM's: the stop string or token id
    return choice


def _envelope(meta: ResponseMeta, streaming: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if streaming else "chat.completion") if meta.chat \
        else "text_completion"
    return {"id": meta.id, "object": kind, "created": meta.created, "model": meta.model}


def response_body(meta: ResponseMeta, outputs: Sequence[RequestOutput | None],
                  params: SamplingParams, prompt_tokens: int,
                  tools: ToolCalls | None = None) -> dict[str, Any]:
    choices = [_choice(meta, p, params, False, tools) for p in final_pieces(outputs, params.n)]
    return {**_envelope(meta, False), "choices": choices, "usage": usage(prompt_tokens, outputs)}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def event_stream(meta: ResponseMeta, stream: RequestStream, params: SamplingParams,
                       include_usage: bool, tools: ToolCalls | None = None
                       ) -> AsyncIterator[str]:
    """Server-sent events: one chunk per choice that changed, then usage if asked, then
    [DONE]. A failure mid-stream (the engine's, or a bug here) becomes an error event, then
    [DONE]: the client always learns the stream ended and why."""
    try:
        async for event in _events(meta, stream, params, include_usage, tools):
            yield event
    except APIError as e:
        yield _event(e.body())
    except Exception:
        logger.exception("%s: the stream failed", meta.id)
        yield _event(server_error("the server failed while streaming this response").body())
    yield DONE


async def _events(meta: ResponseMeta, stream: RequestStream, params: SamplingParams,
                  include_usage: bool, tools: ToolCalls | None) -> AsyncIterator[str]:
    envelope = _envelope(meta, True)
    if include_usage:
        envelope["usage"] = None  # as OpenAI: only the last chunk carries usage

    def chunk(choices: list[dict[str, Any]]) -> str:
        return _event({**envelope, "choices": choices})

    if meta.chat:  # the assistant role comes first, before any content
        for index in range(len(stream.engine_ids) * params.n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
    tracker = DeltaTracker(params)
    async for outputs in stream.updates():
        for piece in tracker.pieces(outputs):
            yield chunk([_choice(meta, piece, params, True, tools)])
    if include_usage:
        yield _event({**envelope, "choices": [],
                      "usage": usage(stream.prompt_tokens, stream.outputs)})
