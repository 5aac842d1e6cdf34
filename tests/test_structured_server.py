"""Structured outputs and tool calls through a real server (the default model, SmolLM2-135M,
whose chat template knows nothing of tools) spoken to by the `openai` client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from nanovllm_onnx.convert.converter import resolve_model
from tests.conftest import default_model_or_skip
from tests.test_server import Server, client, start_server

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                      "description": "Get the current weather in a city"}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME,
                                      "description": "Get the time in a timezone"}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Converted here (once, cached), so the server's start-up timeout covers only loading it.
    default_model_or_skip()
    model = resolve_model(None)
    s = start_server(model, tmp_path_factory.mktemp("structured") / "server.log",
                     "--served-model-name", MODEL)
    yield s
    s.stop()


def _check_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.id and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _streamed(c: openai.OpenAI, **kw: Any) -> tuple[str, list[dict], str | None]:
    """Content, tool calls (merged from their deltas) and the finish reason of a stream."""
    content, calls, finish = "", {}, None
    for chunk in c.chat.completions.create(model=MODEL, stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_tool_calls(server: Server, choice: str, stream: bool) -> None:
    c = client(server)
    messages, names = ASK, {"get_weather", "get_time"}
    tool_choice: Any = choice
    if choice == "named":
        tool_choice, names = {"type": "function", "function": {"name": "get_time"}}, {"get_time"}
    elif choice == "auto":
        # The 135M model calls a tool unprompted only after seeing itself do so.
        messages = []
        for i, city in enumerate(["Rome", "Berlin"]):
            args = json.dumps({"city": city, "unit": "celsius"})
            messages += [{"role": "user", "content": f"What is the weather in {city}?"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": f"call_{i}", "type": "function",
                              "function": {"name": "get_weather", "arguments": args}}]}]
        messages += ASK
    kw = dict(messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=60,
              temperature=0)
    if stream:
        content, calls, finish = _streamed(c, **kw)
        assert finish == "tool_calls" and not content
        for call in calls:
            assert call["id"] and call["name"] in names
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        assert calls
    else:
        r = c.chat.completions.create(model=MODEL, **kw)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and not message.content
        _check_calls(message.tool_calls, names)
    if choice == "auto":
        assert (calls[0]["name"] if stream else message.tool_calls[0].function.name) == \
            "get_weather"


def test_two_turns_with_a_tool_message(server: Server) -> None:
    c = client(server)
    first = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60,
                                      tool_choice="required", parallel_tool_calls=False,
                                      temperature=0)
    message = first.choices[0].message
    assert len(message.tool_calls) == 1  # parallel_tool_calls false: one call
    _check_calls(message.tool_calls, set(SCHEMAS))
    call = message.tool_calls[0]
    messages = [*ASK, {"role": "assistant", "content": None,
                       "tool_calls": [call.model_dump(exclude_none=True)]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 celsius"}]
    second = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       max_tokens=30, temperature=0)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content
    assert not answer.message.tool_calls


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=130)
    role: str = Field(json_schema_extra={"enum": ["engineer", "artist", "doctor"]})


def test_parse_returns_a_pydantic_object(server: Server) -> None:
    r = client(server).chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person."}],
        response_format=Person, max_tokens=80, temperature=1, seed=3)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and person.role in ("engineer", "artist", "doctor")


@pytest.mark.parametrize("body, check", [
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ({"structured_outputs": {"regex": "[0-9]{4}-[0-9]{2}"}},
     lambda t: len(t) == 7 and t[4] == "-"),
    ({"structured_outputs": {"choice": ["red", "blue"]}}, lambda t: t in ("red", "blue")),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}},
     lambda t: jsonschema.validate(json.loads(t), WEATHER) is None),
])
def test_completions_take_the_same_constraints(server: Server, body: dict, check: Any) -> None:
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "prompt": "A JSON object with a name and an age: ", "max_tokens": 60, "temperature": 0,
        **body})
    assert r.status_code == 200, r.text
    assert check(r.json()["choices"][0]["text"])


BAD_SCHEMA = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}


@pytest.mark.parametrize("path, body, param, words", [
    ("chat", {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "x", "schema": BAD_SCHEMA}}},
     "response_format", "Unimplemented keys"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "json_schema.schema"),
    ("completions", {"structured_outputs": {"regex": "(a"}}, "structured_outputs",
     "unclosed group"),
    ("completions", {"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs",
     "unknown name"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}},
     "structured_outputs", "exactly one"),
    ("chat", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "not both"),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters":
                                                         BAD_SCHEMA}}],
              "tool_choice": "required"}, "tools", "Unimplemented keys"),
    ("chat", {"tools": TOOLS, "tool_choice": "required",
              "response_format": {"type": "json_object"}}, "tool_choice", "cannot be combined"),
    ("completions", {"echo": True}, "echo", "not supported"),
    ("completions", {"best_of": 3}, "best_of", "not supported"),
    ("chat", {"guided_json": WEATHER}, "guided_json", "structured_outputs"),
    ("chat", {"functions": [{"name": "f"}]}, "functions", "not supported"),
])
def test_bad_constraints_and_unimplemented_fields_get_400(server: Server, path: str, body: dict,
                                                          param: str, words: str) -> None:
    base = ({"messages": ASK} if path == "chat" else {"prompt": "hi"})
    r = httpx.post(f"{server.url}/v1/{'chat/completions' if path == 'chat' else path}",
                   json={**base, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_slow_compiling_schema_does_not_stall_other_requests(server: Server) -> None:
    """A 2,000-property schema takes llguidance about a second to compile. It is compiled off
    the engine thread, so a stream running meanwhile keeps getting tokens (~15 here, at half its
    pace: the two share the cores); had the engine thread compiled it, the stream would get at
    most a chunk or two while it waits. (With 1,000 properties the window held ~6 tokens
    against the bar's 5: too close.)"""
    big = {"type": "object", "properties": {
        f"f{i}": {"anyOf": [{"type": "string", "pattern": f"^[a-z]{{{i % 5},{i % 5 + 10}}}$"},
                            {"type": "integer", "minimum": i}]} for i in range(2000)}}
    stamps: list[float] = []
    window: list[float] = []

    def constrained() -> None:
        window.append(time.monotonic())
        r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "prompt": "x", "max_tokens": 1, "response_format": {
                "type": "json_schema", "json_schema": {"name": "big", "schema": big}}})
        window.append(time.monotonic())
        assert r.status_code == 200, r.text

    worker = threading.Thread(target=constrained)
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120, json={
            "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
            "stream": True}) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            stamps.append(time.monotonic())
            if len(stamps) == 3:
                worker.start()
            elif len(window) == 2:
                break  # the constrained request is answered: closing the stream aborts it
    worker.join()
    start, end = window
    during = sum(start < t < end for t in stamps)
    assert during >= 5, (during, end - start)
