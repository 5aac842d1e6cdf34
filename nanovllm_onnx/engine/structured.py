"""Structured outputs: grammars compiled by llguidance, one matcher per sequence, and the
token masks applied to the batch's logits.

llguidance (the grammar engine of llama.cpp and one of vLLM's) was chosen over xgrammar on
this CPU (benchmarks/grammar_engines.py): masks in tens of microseconds either way, compiles in
milliseconds where xgrammar takes over a second for a large schema, and no torch or
transformers at import time.

A grammar is compiled once per constraint (StructuredOutputsParams.key()) and cached; each
sequence gets a copy of the compiled matcher. The masks of a step are computed on a worker
thread while ONNX Runtime runs the model (both release the GIL), then applied to the logits in
numpy before sampling.
With speculative decoding a sequence's drafts are first cut to what its grammar takes, and its
verified rows get the masks after the drafts before them (the matcher consumes the drafts
while the masks are filled, then is rolled back).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np

from nanovllm_onnx.engine.speculative import VerifyRow
from nanovllm_onnx.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from nanovllm_onnx.engine.sequence import Sequence

# JSON as json.dumps writes it: readable, and no free whitespace a small model could run on
# with (vLLM's backends allow any whitespace unless told otherwise; whitespace_pattern opens it).
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
ANY_OBJECT = {"type": "object"}
CACHE_SIZE = 256  # compiled constraints kept, least recently used dropped first


def grammar_of(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not yet checked)."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = params.json if kind == "json" else ANY_OBJECT
        options = dict(JSON_OPTIONS)
        if params.whitespace_pattern is not None:
            options.update(whitespace_flexible=True, whitespace_pattern=params.whitespace_pattern)
        return llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llg.grammar_from("choice", params.choice)
    if kind == "grammar":
        return llg.grammar_from("grammar", params.grammar)  # Lark, or GBNF turned into Lark
    return _structural_tag_grammar(params.structural_tag)


def _structural_tag_grammar(tag: str | dict) -> str:
    """vLLM's structural tag: free text in which each trigger starts a structure whose content
    follows its schema: {"type": "structural_tag", "structures": [{"begin", "schema", "end"}],
    "triggers": [...]}."""
    spec = json.loads(tag) if isinstance(tag, str) else tag
    try:
        triggers = list(spec["triggers"])
        tags = []
        for s in spec["structures"]:
            trigger = next(t for t in triggers if s["begin"].startswith(t))
            tags.append(llg.StructTag(trigger=trigger, begin=s["begin"],
                                      grammar=s.get("schema") or ANY_OBJECT, end=s["end"]))
    except (KeyError, TypeError, StopIteration, AssertionError) as e:
        raise ValueError("structural_tag must be {\"structures\": [{\"begin\", \"schema\", "
                         "\"end\"}], \"triggers\": [...]} with each begin starting with a "
                         f"trigger ({type(e).__name__}: {e})") from e
    return llg.StructTag.to_grammar(tags)


class GrammarMatcher:
    """One sequence's position in its grammar. The speculative decoder's interface too:
    `validate` says how many draft tokens the grammar takes, `rollback` undoes accepted ones."""

    def __init__(self, matcher: llg.LLMatcher) -> None:
        self._m = matcher

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar does not admit it."""
        return self._m.consume_token(token)

    def validate(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar admits from here (nothing consumed)."""
        return self._m.validate_tokens(tokens)

    def rollback(self, num_tokens: int) -> None:
        if not self._m.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback failed: {self._m.get_error()}")

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and admits nothing more (its output is whole)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the grammar failed (a resource limit, or a token it did not admit), or None."""
        return (self._m.get_error() or self._m.stop_reason()) if self._m.is_error() else None

    @property
    def matcher(self) -> llg.LLMatcher:
        return self._m


class GrammarCompiler:
    """Compiles constraints for one tokenizer and caches them (thread-safe: the server compiles
    off the engine thread)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._args = (tokenizer_json, vocab_size, eos_token_ids)
        self._tokenizer: llg.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()

    @property
    def tokenizer(self) -> llg.LLTokenizer:
        # Built on first use: ~0.3 s at 49k tokens, ~3 s at 152k.
        with self._lock:
            if self._tokenizer is None:
                tokenizer_json, vocab, eos = self._args
                self._tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
            return self._tokenizer

    def compile(self, params: StructuredOutputsParams) -> llg.LLMatcher:
        """The compiled constraint (cached). Raises ValueError naming what is wrong with it."""
        key = params.key()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        tokenizer = self.tokenizer
        try:
            grammar = grammar_of(params)
        except ValueError as e:
            raise ValueError(f"invalid structured_outputs.{params.kind}: {e}") from e
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"invalid structured_outputs.{params.kind}: {messages[0]}")
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid structured_outputs.{params.kind}: {matcher.get_error()}")
        with self._lock:
            self._cache[key] = matcher
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A fresh matcher for one sequence."""
        return GrammarMatcher(self.compile(params).deep_copy())


class TokenMasks:
    """The masks of one step's constrained rows, computed in the background."""

    def __init__(self, rows: list[int], matchers: list[GrammarMatcher], future: Future,
                 bitmask: np.ndarray) -> None:
        self.rows = rows  # rows of the step's logits (and its sampling list) with a grammar
        self._matchers = matchers
        self._future = future
        self._bitmask = bitmask

    def apply(self, logits: np.ndarray) -> list[int]:
        """Set every token the grammar rules out to -inf. Returns the rows that must not be
        sampled: their grammar admits no token, or failed (llguidance then admits only EOS,
        which would pass for a normal end)."""
        self._future.result()
        vocab = logits.shape[1]
        bits = np.unpackbits(self._bitmask.view(np.uint8), axis=1, count=vocab,
                             bitorder="little").view(bool)
        if len(self.rows) == len(logits):
            np.copyto(logits, -np.inf, where=~bits)
        else:
            logits[self.rows] = np.where(bits, logits[self.rows], np.float32(-np.inf))
        dead = ~bits.any(axis=1)
        return [row for row, m, d in zip(self.rows, self._matchers, dead)
                if d or m.error is not None]


class StructuredOutputs:
    """The engine's structured-output state: the compiler and the mask worker."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._executor: llg.LLExecutor | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")

    def start_masks(self, rows: Seq[Sequence | VerifyRow]) -> TokenMasks | None:
        """Start computing the masks of the constrained ones among `rows` (the step's sampled
        rows, in order); None when none is constrained. A verification's row after j drafts
        gets the grammar's mask after those drafts."""
        constrained = [i for i, row in enumerate(rows) if row.grammar is not None]
        if not constrained:
            return None
        if self._executor is None:
            self._executor = llg.LLExecutor()
        bitmask = llg_np.allocate_token_bitmask(len(constrained),
                                                self.compiler.tokenizer.vocab_size)
        matchers = [rows[i].grammar for i in constrained]
        future = self._worker.submit(fill_masks, self._executor,
                                     [rows[i] for i in constrained], bitmask)
        return TokenMasks(constrained, matchers, future, bitmask)


def fill_masks(executor: llg.LLExecutor, rows: list[Sequence | VerifyRow],
               bitmask: np.ndarray) -> None:
    """Row b's mask into bitmask[b]. Rows by depth (drafts before them): each level in
    parallel, then every matcher with a deeper row consumes its draft at that depth; the
    matchers are rolled back to where they were after the last level."""
    depths = [row.num_drafts if isinstance(row, VerifyRow) else 0 for row in rows]
    consumed: dict[GrammarMatcher, int] = {}
    try:
        for depth in range(max(depths) + 1):
            level = [b for b, d in enumerate(depths) if d == depth]
            llg_np.fill_next_token_bitmask_par(
                executor, [(rows[b].grammar.matcher, b) for b in level], bitmask)
            for b in level:
                row = rows[b]
                if isinstance(row, VerifyRow) and depth < len(row.seq.draft_token_ids):
                    # The drafts were validated: the grammar takes them.
                    row.grammar.accept(row.seq.draft_token_ids[depth])
                    consumed[row.grammar] = consumed.get(row.grammar, 0) + 1
    finally:
        for matcher, n in consumed.items():
            matcher.rollback(n)
