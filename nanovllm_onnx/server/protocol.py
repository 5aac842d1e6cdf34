"""Request bodies of the OpenAI API as vLLM serves it, and OpenAI-style errors."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nanovllm_onnx.sampling_params import SamplingParams, StructuredOutputsParams
from nanovllm_onnx.server import tool_parsers

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
    "max_tokens", "logprobs", "prompt_logprobs", "logit_bias", "structured_outputs"}

# Fields of OpenAI's or vLLM's API that would change the answer and that this server does not
# implement: refused (400) unless they hold their no-op value, never silently ignored. Fields
# that change nothing in the answer (user, metadata, store, service_tier, priority) are ignored.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0),
    "allowed_token_ids": (None,), "bad_words": (None, []), "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,), "logits_processors": (None, []),
    "functions": (None, []), "function_call": (None,), "prediction": (None,),
    "audio": (None,), "modalities": (None, ["text"]), "reasoning_effort": (None,),
    "web_search_options": (None,), "chat_template": (None,), "chat_template_kwargs": (None, {}),
    "continue_final_message": (None, False), "documents": (None, []),
    "add_special_tokens": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "guided_json_object": (None, False),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,),
}


class ResponseFormatSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: ResponseFormatSchema | None = None


class StructuredOutputs(OpenAIModel):
    """vLLM's `structured_outputs` request field (StructuredOutputsParams' names)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    whitespace_pattern: str | None = None


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
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    model_config = ConfigDict(extra="allow")  # kept, to refuse what is not implemented

    @model_validator(mode="after")
    def _refuse_unimplemented(self) -> SamplingRequest:
        for name, value in (self.model_extra or {}).items():
            if name in _UNSUPPORTED and value not in _UNSUPPORTED[name]:
                hint = " (use structured_outputs)" if name.startswith("guided_") else ""
                raise bad_request(f"'{name}' is not supported by this server{hint}", name)
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Token ids are checked against the vocabulary when the engine adds the request."""
        kw = self.model_dump(include=_SHARED_FIELDS, exclude_none=True)
        constraint = self._constraint()
        try:
            return SamplingParams(**kw, max_tokens=max_tokens, logprobs=logprobs,
                                  logit_bias=self._logit_bias(), structured_outputs=constraint)
        except ValueError as e:
            raise bad_request(str(e), param_in(e)) from e

    def _constraint(self) -> StructuredOutputsParams | None:
        """response_format or structured_outputs (one of them at most)."""
        asked = {}
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked["response_format"] = dict(json_object=True)
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise bad_request("response_format json_schema needs json_schema.schema",
                                  "response_format")
            asked["response_format"] = dict(json=rf.json_schema.schema_)
        if self.structured_outputs is not None:
            asked["structured_outputs"] = self.structured_outputs.model_dump(
                by_alias=True, exclude_none=True)
        if len(asked) > 1:
            raise bad_request("give response_format or structured_outputs, not both",
                              "structured_outputs")
        for param, kw in asked.items():
            try:
                return StructuredOutputsParams(**kw)
            except ValueError as e:
                raise bad_request(f"{param}: {e}", param) from e
        return None

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


class FunctionCall(OpenAIModel):
    name: str
    arguments: str


class ToolCallBody(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Role
    content: str | list[TextContent] | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def template_message(self) -> dict[str, Any]:
        """As chat templates take it: tool call arguments as objects (vLLM does the same)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except json.JSONDecodeError as e:
                    raise bad_request(f"tool call arguments must be a JSON object: {e}",
                                      "messages") from e
                calls.append({"id": call.id, "type": "function", "function": {
                    "name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message

    def text(self) -> str:
        if self.content is None:
            return ""  # e.g. an assistant turn that only called tools; templates want a str
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # vLLM joins text parts so


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatInput:
    """A request's conversation and tools (its `messages` and `tools` fields) as the chat
    template takes them."""

    messages: list[ChatMessage] | None
    tools: list[Tool] | None

    def conversation(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages or []]

    def tool_definitions(self) -> list[dict[str, Any]]:
        """The tools in OpenAI's form."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]


class ChatCompletionRequest(SamplingRequest, ChatInput):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # OpenAI's older name for max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's extension
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @property
    def tool_mode(self) -> str:
        """none, auto, required or named: how tool calls are made and read."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise bad_request("tool_choice needs tools", "tool_choice")
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"  # OpenAI's default when tools are given

    def named_tool(self) -> dict[str, Any]:
        assert isinstance(self.tool_choice, NamedToolChoice)
        name = self.tool_choice.function.name
        for tool in self.tools or []:
            if tool.function.name == name:
                return tool.function.model_dump(exclude_none=True)
        raise bad_request(f"tool_choice names the function {name!r}, which is not among the "
                          "tools", "tool_choice")

    def _constraint(self) -> StructuredOutputsParams | None:
        constraint = super()._constraint()
        mode = self.tool_mode
        if mode not in ("required", "named"):
            return constraint
        if constraint is not None:
            raise bad_request(f"tool_choice {mode!r} cannot be combined with response_format or "
                              "structured_outputs", "tool_choice")
        if mode == "named":
            return tool_parsers.named_constraint(self.named_tool())
        return tool_parsers.required_constraint(
            [t.function.model_dump(exclude_none=True) for t in self.tools or []],
            self.parallel_tool_calls is not False)

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        max_tokens = (self.max_completion_tokens if self.max_completion_tokens is not None
                      else self.max_tokens)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


class TokenizeRequest(OpenAIModel, ChatInput):
    """vLLM's /tokenize: a prompt, or a conversation as the chat template renders it."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    # vLLM's defaults: the tokenizer's special tokens for a prompt; none for a conversation,
    # whose template writes them
    add_special_tokens: bool | None = None
    return_token_strs: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give either prompt or messages", "prompt")
        for name in ("continue_final_message", "chat_template"):  # would change the tokens
            if getattr(self, name):
                raise bad_request(f"'{name}' is not supported by this server", name)
        return self


class DetokenizeRequest(OpenAIModel):
    """vLLM's /detokenize: token ids back to text (special tokens kept, as vLLM keeps them)."""

    model: str | None = None
    tokens: list[int]
