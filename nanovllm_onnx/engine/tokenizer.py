"""Tokenizer (Hugging Face tokenizer.json), chat template and incremental detokenization."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from nanovllm_onnx.config import TOKENIZER_FILE, ModelConfig

Message = dict[str, Any]

# For a chat template that does not render tools itself (SmolLM2's, for one): the tools and the
# call format as Qwen2.5's template writes them, in a system message (Hermes' format).
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


class TextTokenizer:
    def __init__(self, model_dir: Path, cfg: ModelConfig) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        self.cfg = cfg
        self._template = None
        self.template_renders_tools = "tools" in (cfg.chat_template or "")
        if cfg.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
            self._template = env.from_string(cfg.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_unicode(text)
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.cfg.bos_token_id
        # tokenizer.json may or may not add BOS itself; add it once where the model wants it.
        if add_special_tokens and self.cfg.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str | None]:
        """Each id's token as the vocabulary writes it (None: an id past the tokenizer's
        vocabulary, in the model's padding)."""
        return [self.tokenizer.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use generate() with a plain "
                             "prompt instead of chat()")
        if tools and not self.template_renders_tools:
            messages, tools = _with_tools_in_text(messages, tools), None
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.cfg.bos_token or "", eos_token=self.cfg.eos_token or "",
            )
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from e

    def chat_prompt_ids(self, messages: list[Message], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
        # The template writes any BOS itself.
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        return self.encode(text, add_special_tokens=False)


def _with_tools_in_text(messages: list[Message], tools: list[dict]) -> list[Message]:
    """The conversation with the tools in its system message and earlier calls and their
    results written out in Hermes' format, for a template that knows nothing of tools."""
    prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False)
                                                 for t in tools))
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
    else:
        out.insert(0, {"role": "system", "content": prompt})
    for m in out:
        calls = m.pop("tool_calls", None)
        if calls:
            text = "\n".join("<tool_call>\n" + json.dumps(
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                ensure_ascii=False) + "\n</tool_call>" for c in calls)
            m["content"] = f"{m.get('content') or ''}{text}"
        if m["role"] == "tool":
            m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
    return out


def _check_unicode(text: str) -> None:
    """Refuse what is not Unicode text: a lone UTF-16 surrogate ("\\ud800" in JSON) has no
    UTF-8 encoding, so no tokenizer can read it. Refused, not replaced, as OpenAI's API does:
    a silently altered prompt would be worse than a clear error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode: a lone UTF-16 surrogate at character "
                         f"{e.start}") from None


def _raise(message: str) -> None:
    raise TemplateError(message)


class IncrementalDetokenizer:
    """Text of a growing token list, never emitting half of a multi-byte character.

    vLLM's way: decode a short window (the tokens already shown, then the new ones) and emit
    what the new ones add once it ends in a whole character. tokenizers' DecodeStream does the
    same but raises when a window's text changes its start, which byte-fallback tokens
    (SentencePiece's <0xNN>) forming no valid UTF-8 do.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer.tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._shown = 0  # tokens whose text was emitted
        self._window = 0  # where the decoded window starts: at the last token shown

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        shown = self._decode(self._ids[self._window:self._shown])
        text = self._decode(self._ids[self._window:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self._window, self._shown = self._shown, len(self._ids)
        return text[len(shown):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
