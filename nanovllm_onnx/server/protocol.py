"""Request bodies of the OpenAI API as vLLM serves it, and OpenAI-style errors."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nanovllm_onnx.sampling_params import SamplingParams

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
INT64_MAX = 2**63 - 1

Prompt = str | list[int]
_PARAM_IN_ERROR = re.compile(r"SamplingParams\.(\w+)")


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def param_in(error: ValueError) -> str | None:
    """The field a SamplingParams or engine error names ("SamplingParams.top_p must ...")."""
    match = _PARAM_IN_ERROR.search(str(error))
    return match.group(1) if match else None


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


class OpenAIModel(BaseModel):
    # Unknown fields are ignored (as vLLM does) so clients sending newer fields keep working;
    # NaN and infinities are refused here because the sampler cannot use them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False


# Request fields passed to SamplingParams under the same name and meaning.
_SHARED_FIELDS = {f.name for f in fields(SamplingParams) if f.init} - {
    "max_tokens", "logprobs", "prompt_logprobs", "logit_bias"}


class SamplingRequest(OpenAIModel):
    """Fields common to completions and chat completions. None means the default; sampling
    values are validated by SamplingParams, only API limits are checked here."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, le=INT64_MAX)  # the sampler holds it in an int64 array
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, ge=0)  # numpy's generators take non-negative seeds
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Token ids are checked against the vocabulary when the engine adds the request."""
        kw = self.model_dump(include=_SHARED_FIELDS, exclude_none=True)
        try:
            return SamplingParams(**kw, max_tokens=max_tokens, logprobs=logprobs,
                                  logit_bias=self._logit_bias())
        except ValueError as e:
            raise bad_request(str(e), param_in(e)) from e

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's form, {"token id": bias}, as SamplingParams takes it."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.strip().isdecimal():
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}",
                                  "logit_bias")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise bad_request(f"logit_bias values must be in [-100, 100], got {value}",
                                  "logit_bias")
            bias[int(key)] = value
        return bias


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[Prompt]:
        """The batch of prompts: a text, token ids, or a list of either."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextContent(OpenAIModel):
    type: Literal["text"]
    text: str


# OpenAI's message roles; any other is a 400, as from OpenAI (a template would render it).
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(OpenAIModel):
    role: Role
    content: str | list[TextContent] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""  # e.g. an assistant turn that only called tools; templates want a str
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # vLLM joins text parts so


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # OpenAI's older name for max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's extension

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        max_tokens = (self.max_completion_tokens if self.max_completion_tokens is not None
                      else self.max_tokens)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)
