"""Tool calls: the constraint for tool_choice "required" or a named function, and the parsers
that find calls in a model's free text (tool_choice "auto"), streamed or not.

As vLLM: a named function constrains the output to that function's parameters (the output is
the arguments); "required" constrains it to a JSON array of {"name", "parameters"} objects, one
per call. Neither depends on the model's own call format, so even a small model answers with a
call that parses. "auto" leaves the text free and the parser of the model's format (Hermes
<tool_call> tags, or Llama 3's bare JSON) finds the calls in it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from nanovllm_onnx.sampling_params import StructuredOutputsParams


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"

    def body(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call(obj: Any, args_key: str) -> ToolCall | None:
    """A ToolCall from {"name": ..., args_key: {...}} (or None if it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    """Finds tool calls in free text. `start` is the text that opens the calls: what comes
    before it is content, streamed as it comes; from it on, the text is held until the end."""

    name = ""
    start = ""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls). The text stays content when no call parses."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """How much of a growing text is surely content: up to `start`, or up to a tail that
        could be the beginning of it."""
        index = text.find(self.start)
        if index != -1:
            return index
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-k:]):
                return len(text) - k
        return len(text)


class HermesToolParser(ToolParser):
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call>, one tag per call (Qwen2.5,
    Hermes, SmolLM2)."""

    name = "hermes"
    start = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        index = text.find(self.start)
        if index == -1:
            return text, []
        calls = []
        for body in self._CALL.findall(text[index:]):
            try:
                call = _call(json.loads(body), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:index].strip() or None, calls


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x: {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, several
    separated by ";"."""

    name = "llama3_json"
    start = "{"
    _TAG = "<|python_tag|>"

    def content_end(self, text: str) -> int:
        stripped = text.lstrip()
        if stripped.startswith(self._TAG) or stripped.startswith("{") or \
                self._TAG.startswith(stripped):
            return 0  # a call, or the start of one: hold it all
        return len(text)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self._TAG).strip()
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            while i < len(body) and body[i] in " \t\n;":
                i += 1
        return (None, calls) if calls else (text, [])


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}


def parser_for(chat_template: str | None, name: str | None = None) -> ToolParser:
    """--tool-call-parser NAME, else the format the chat template writes (Hermes when the
    template says nothing of tools: tokenizer.py then writes the tools in Hermes form)."""
    if name is not None:
        if name not in PARSERS:
            raise ValueError(f"unknown tool call parser {name!r}; choose one of "
                             f"{', '.join(PARSERS)}")
        return PARSERS[name]()
    template = chat_template or ""
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template
                                        and "<tool_call>" not in template):
        return Llama3JsonToolParser()
    return HermesToolParser()


def required_constraint(tools: list[dict], parallel: bool) -> StructuredOutputsParams:
    """tool_choice "required": a JSON array of calls, each the name of one of the tools and
    arguments that fit its parameters (one call when parallel_tool_calls is false)."""
    one_of = [{"type": "object",
               "properties": {"name": {"const": t["name"]},
                              "parameters": t.get("parameters") or {"type": "object"}},
               "required": ["name", "parameters"], "additionalProperties": False}
              for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def named_constraint(tool: dict) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=tool.get("parameters") or {"type": "object"})


def required_calls(text: str) -> list[ToolCall]:
    """The calls of an output constrained by required_constraint (none if it was cut short)."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [c for c in map(lambda obj: _call(obj, "parameters"), calls) if c is not None]
