"""The tool call parsers on the formats of the models they are for, whole and streamed."""

from __future__ import annotations

import json

import pytest

from nanovllm_onnx.server.serving import Piece, ToolCalls
from nanovllm_onnx.server.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    parser_for,
)

QWEN_TEMPLATE = "{%- if tools %}...<tool_call>\\n{\"name\": ...}</tool_call>{%- endif %}"
LLAMA3_TEMPLATE = "<|start_header_id|>ipython<|end_header_id|>{{ tools }}<|python_tag|>"


def test_parser_is_chosen_from_the_template_or_by_name() -> None:
    assert isinstance(parser_for(QWEN_TEMPLATE), HermesToolParser)
    assert isinstance(parser_for(LLAMA3_TEMPLATE), Llama3JsonToolParser)
    assert isinstance(parser_for(None), HermesToolParser)
    assert isinstance(parser_for(QWEN_TEMPLATE, "llama3_json"), Llama3JsonToolParser)
    with pytest.raises(ValueError, match="unknown tool call parser 'mistral'"):
        parser_for(None, "mistral")


def test_hermes() -> None:
    p = HermesToolParser()
    text = ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>')
    content, calls = p.extract(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert calls[0].id != calls[1].id
    assert p.extract("no calls here") == ("no calls here", [])
    broken = '<tool_call>{"name": "f", "arguments": {"x": </tool_call>'
    assert p.extract(broken) == (broken, [])  # not a call: the text stays content
    assert p.content_end("abc <tool_") == 4 and p.content_end("abc <tool_call>{") == 4
    assert p.content_end("a < b") == 5


def test_llama3_json() -> None:
    p = Llama3JsonToolParser()
    content, calls = p.extract('<|python_tag|>{"name": "f", "parameters": {"x": "y"}}; '
                               '{"name": "g", "parameters": {}}')
    assert content is None and [c.name for c in calls] == ["f", "g"]
    assert json.loads(calls[0].arguments) == {"x": "y"}
    assert p.extract("Paris is sunny.") == ("Paris is sunny.", [])
    assert p.extract('{"a": 1}') == ('{"a": 1}', [])  # JSON, but not a call
    assert p.content_end('{"name"') == 0 and p.content_end("Hi") == 2


def test_streamed_auto_sends_content_then_the_calls_whole() -> None:
    tools = ToolCalls("auto", HermesToolParser())
    pieces = ["Sure", ". <tool", '_call>\n{"name": "f", ', '"arguments": {"a": [1]}}\n</tool_call>']
    deltas = []
    for i, text in enumerate(pieces):
        finish = "stop" if i == len(pieces) - 1 else None
        deltas.append(tools.delta(Piece(0, text, [], None, 0, finish, None)))
    content = "".join(d.get("content", "") for d, _ in deltas)
    assert content == "Sure. "
    last, finish = deltas[-1]
    assert finish == "tool_calls"
    call = last["tool_calls"][0]
    assert call["index"] == 0 and call["function"]["name"] == "f"
    assert json.loads(call["function"]["arguments"]) == {"a": [1]}


def test_auto_without_parallel_tool_calls_keeps_the_first_call() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>' * 2
    message, _ = ToolCalls("auto", HermesToolParser(), parallel=False).message(
        Piece(0, text, [], None, 0, "stop", None))
    assert len(message["tool_calls"]) == 1


def test_required_and_named_outputs() -> None:
    required = ToolCalls("required", HermesToolParser())
    message, finish = required.message(Piece(0, '[{"name": "f", "parameters": {"a": 1}}]', [],
                                              None, 0, "stop", None))
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    named = ToolCalls("named", HermesToolParser(), "g")
    message, finish = named.message(Piece(0, '{"b": 2}', [], None, 0, "stop", None))
    assert message["tool_calls"][0]["function"] == {"name": "g", "arguments": '{"b": 2}'}
    # Cut short by max_tokens: no call, the text as content, the finish reason kept.
    message, finish = named.message(Piece(0, '{"b": ', [], None, 0, "length", None))
    assert finish == "length" and message["content"] == '{"b": ' and not message["tool_calls"]
