"""Sampling parameters with vLLM's names, defaults and validation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# StructuredOutputsParams' constraint fields: exactly one is set.
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's constrained-decoding request: exactly one of json (a JSON schema as a dict, a JSON
    string or a Pydantic model class), regex, choice (a list of strings), grammar (Lark or
    GBNF), json_object (any JSON object) or structural_tag (vLLM's JSON string or dict).
    whitespace_pattern: the regex JSON whitespace must match (default: no free whitespace,
    as vLLM's backends)."""

    json: str | dict | type | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, type):  # a Pydantic model class, as vLLM takes it
            schema = getattr(self.json, "model_json_schema", None)
            if schema is None:
                raise ValueError("StructuredOutputsParams.json must be a JSON schema (dict or "
                                 f"string) or a Pydantic model, got {self.json!r}")
            self.json = schema()
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"StructuredOutputsParams.json is not valid JSON: {e}") from e
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError("StructuredOutputsParams.json must be a JSON schema object, "
                             f"got {type(self.json).__name__}")
        if self.json_object is False:
            self.json_object = None
        set_ = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(set_) != 1:
            raise ValueError("StructuredOutputsParams needs exactly one of "
                             f"{', '.join(CONSTRAINTS)}; got {', '.join(set_) or 'none'}")
        if self.choice is not None and (
                not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("StructuredOutputsParams.choice must be a non-empty list of "
                             f"strings, got {self.choice!r}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"StructuredOutputsParams.{name} must be a string, "
                                 f"got {value!r}")

    @property
    def kind(self) -> str:
        return next(name for name in CONSTRAINTS if getattr(self, name) is not None)

    def key(self) -> str:
        """A string naming the constraint exactly: compiled grammars are cached under it."""
        value: Any = getattr(self, self.kind)
        return json.dumps([self.kind, value, self.whitespace_pattern], sort_keys=True)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0.0, "must be non-negative"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1 (disable), 0 (disable) or at least 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be greater than 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            (
                "min_tokens",
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "must be less than or equal to max_tokens",
            ),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be non-negative"),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                "must be non-negative",
            ),
            ("stop", all(isinstance(s, str) and s for s in self.stop_strings),
             "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
