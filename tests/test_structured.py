"""Structured outputs offline: every sampled output obeys its JSON schema, regex, choice or
grammar (checked by jsonschema and re, not by the grammar engine), and constrained requests
leave the unconstrained ones of their batch untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from nanovllm_onnx import LLM, SamplingParams, StructuredOutputsParams
from tests.conftest import random_prompts

SEEDS = (1, 2, 3)
WORD = {"type": "string", "maxLength": 8}
# Strings and arrays are bounded so that even a random model at temperature 1 ends in time.
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {  # nested objects
        "user": {"type": "object", "properties": {"name": WORD, "id": {"type": "integer"}},
                 "required": ["name", "id"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "size": {"enum": [1, 2, 3]}},
     "required": ["color", "size"], "additionalProperties": False},
    {"type": "object", "properties": {  # bounded numbers
        "x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "n": {"type": "integer", "exclusiveMinimum": 3, "maximum": 9}},
     "required": ["x", "n"], "additionalProperties": False},
    {"type": "object", "properties": {  # strings with patterns
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[a-z]{1,3}$"}},
     "required": ["zip", "code"], "additionalProperties": False},
    {"type": "object", "properties": {  # optional fields
        "a": {"type": "boolean"}, "b": {"type": "integer"}, "c": WORD},
     "required": ["a"], "additionalProperties": False},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"},
                                                          "y": {"type": "integer"}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/point"},
                                      "to": {"$ref": "#/$defs/point"}},
     "required": ["from", "to"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": WORD, "minItems": 1,
                                               "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "boolean"}, {"type": "null"}]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}},
     "required": ["id"], "additionalProperties": False},
]
FP32 = dict(kv_cache_dtype="fp32")


@pytest.fixture(scope="module")
def llm(converted: dict[str, Path]) -> LLM:
    return LLM(str(converted["llama"]), **FP32)


def constrained(seed: int, max_tokens: int = 300, **constraint: object) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


def test_json_schemas_are_obeyed_at_temperature_1(llm: LLM) -> None:
    prompts = random_prompts(len(SCHEMAS) * len(SEEDS), seed=5)
    params = [constrained(seed, json=schema) for schema in SCHEMAS for seed in SEEDS]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outputs, params):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (c.text, p.structured_outputs.json)
        jsonschema.validate(json.loads(c.text), p.structured_outputs.json,
                            format_checker=jsonschema.FormatChecker())
    # The grammars were compiled once per schema, not once per request.
    assert len(llm.llm_engine.structured.compiler._cache) == len(SCHEMAS)


def test_json_object_regex_choice_and_grammars(llm: LLM) -> None:
    regex = r"[0-9]{3}-[a-z]{2,4}(\.[A-Z])?"
    choices = ["yes", "no", "maybe not"]
    lark = 'start: "(" item ("," item)* ")"\nitem: /[a-c]{1,3}/ | start'
    gbnf = 'root ::= "<" [xyz]+ ">" | "none"'
    cases = [("json_object", True), ("regex", regex), ("choice", choices), ("grammar", lark),
             ("grammar", gbnf)]
    params = [constrained(seed, max_tokens=120, **{k: v}) for k, v in cases for seed in SEEDS]
    outputs = llm.generate(random_prompts(len(params), seed=6), params, use_tqdm=False)
    for i, out in enumerate(outputs):
        kind, _ = cases[i // len(SEEDS)]
        text = out.outputs[0].text
        if kind == "json_object":  # free keys and values: a random model may not end in time
            if out.outputs[0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
            else:
                assert text.startswith("{")
            continue
        assert out.outputs[0].finish_reason == "stop", (kind, text)
        if kind == "regex":
            assert re.fullmatch(regex, text), text
        elif kind == "choice":
            assert text in choices
        elif i // len(SEEDS) == 3:
            assert _lark_match(text), text
        else:
            assert re.fullmatch(r"<[xyz]+>|none", text), text


def _lark_match(text: str) -> bool:
    """start: "(" item ("," item)* ")", item: /[a-c]{1,3}/ | start -- by recursive descent."""
    def start(i: int) -> int:
        if i >= len(text) or text[i] != "(":
            return -1
        i = item(i + 1)
        while i != -1 and i < len(text) and text[i] == ",":
            i = item(i + 1)
        return i + 1 if i != -1 and i < len(text) and text[i] == ")" else -1

    def item(i: int) -> int:
        if i < len(text) and text[i] == "(":
            return start(i)
        j = i
        while j < len(text) and j - i < 3 and text[j] in "abc":
            j += 1
        return j if j > i else -1

    return start(0) == len(text)


def test_unconstrained_requests_keep_their_greedy_tokens_in_a_mixed_batch(llm: LLM) -> None:
    prompts = random_prompts(6, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], greedy, use_tqdm=False)]
    mixed = [greedy] * 3 + [constrained(s, json=SCHEMAS[1]) for s in SEEDS]
    outputs = llm.generate(prompts, mixed, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[:3]] == alone
    for out in outputs[3:]:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[1])


def test_composes_with_n_logprobs_stop_chunked_prefill_and_preemption(
        converted: dict[str, Path]) -> None:
    # Room for 3 sequences of 128 tokens (512 bytes a token) and 16-token chunks: preemption
    # and chunked prefill.
    llm = LLM(str(converted["llama"]), **FP32, max_num_seqs=8, max_model_len=128,
              max_num_batched_tokens=16, kv_cache_memory_gib=3 * 128 * 512 / 2**30)
    schema = SCHEMAS[8]
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=80, logprobs=2,
                            structured_outputs=StructuredOutputsParams(json=schema))
    outputs = llm.generate(random_prompts(4, seed=8, lo=30, hi=40), params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    again = llm.generate(random_prompts(4, seed=8, lo=30, hi=40), params, use_tqdm=False)
    for out, out2 in zip(outputs, again):
        assert len(out.outputs) == 3
        for c, c2 in zip(out.outputs, out2.outputs):
            jsonschema.validate(json.loads(c.text), schema)
            assert c.token_ids == c2.token_ids  # seeds still decide the tokens
            assert len(c.logprobs) == len(c.token_ids)
    # vLLM applies stop strings to constrained outputs too: the text ends before the stop.
    stop = SamplingParams(temperature=0, max_tokens=60, stop=['"]'],
                          structured_outputs=StructuredOutputsParams(json=schema))
    out = llm.generate(random_prompts(1, seed=9), stop, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == '"]'
    assert out.text.startswith('{"tags": ["') and '"]' not in out.text


@pytest.mark.parametrize("constraint, message", [
    (dict(json={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
     "Unimplemented keys"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(regex="(a"), "unclosed group"),
    (dict(grammar="start: foo"), 'unknown name: "foo"'),
    (dict(grammar="root ::= [a-"), "invalid structured_outputs.grammar"),
    (dict(choice=[]), "non-empty list"),
    (dict(json={"type": "object"}, regex="a"), "exactly one"),
    (dict(structural_tag={"structures": []}), "triggers"),
])
def test_bad_constraints_raise_value_errors_naming_them(llm: LLM, constraint: dict,
                                                        message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        params = SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
        llm.llm_engine.add_request("bad", [5, 6, 7], params)
    assert not llm.llm_engine.has_unfinished_requests()


def test_pydantic_model_as_schema(llm: LLM) -> None:
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=6)
        population: int = Field(ge=0, le=10**7)

    params = constrained(4, json=City)
    out = llm.generate(random_prompts(1, seed=10), params, use_tqdm=False)[0]
    City.model_validate_json(out.outputs[0].text)


def test_a_failed_grammar_ends_only_its_sequence_with_finish_reason_error(llm: LLM) -> None:
    engine = llm.llm_engine
    prompts = random_prompts(2, seed=12)
    engine.add_request("failing", prompts[0], constrained(1, regex="[a-z]{30}"))
    engine.add_request("free", prompts[1], SamplingParams(temperature=0, max_tokens=8))
    engine.step()
    # llguidance fails only past its resource limits; a token its grammar rejects fails it too.
    matcher = engine.requests["failing"].seqs[0].grammar
    assert not matcher.matcher.consume_token(engine.tokenizer.encode("7")[0])
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    failed = outputs["failing"].outputs[0]
    assert failed.finish_reason == "error" and "grammar dead end" in failed.stop_reason
    assert len(failed.token_ids) == 1
    assert outputs["free"].outputs[0].finish_reason == "length"


def test_abort_mid_grammar_frees_everything(llm: LLM) -> None:
    engine = llm.llm_engine
    params = constrained(2, json=SCHEMAS[1])
    engine.add_request("aborted", random_prompts(1, seed=13)[0], params)
    for _ in range(3):
        engine.step()
    engine.abort_request("aborted")
    assert not engine.has_unfinished_requests() and not engine.scheduler.running
    assert engine.block_manager.num_seq_blocks == 0
    out = llm.generate(random_prompts(1, seed=13), params, use_tqdm=False)[0]  # same grammar
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[1])
