"""Tokenizer (Hugging Face tokenizer.json), chat template and incremental detokenization."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from nanovllm_onnx.config import TOKENIZER_FILE, ModelConfig

Message = dict[str, str]


class TextTokenizer:
    def __init__(self, model_dir: Path, cfg: ModelConfig) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
        self.cfg = cfg
        self._template = None
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

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True
                            ) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use generate() with a plain "
                             "prompt instead of chat()")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.cfg.bos_token or "", eos_token=self.cfg.eos_token or "",
            )
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from e

    def chat_prompt_ids(self, messages: list[Message], add_generation_prompt: bool = True
                        ) -> list[int]:
        # The template writes any BOS itself.
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


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
