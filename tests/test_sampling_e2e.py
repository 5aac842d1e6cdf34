"""vLLM's sampling and text semantics through the whole engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.engine.tokenizer import IncrementalDetokenizer
from tests.conftest import random_prompts

PROMPT = random_prompts(1, seed=7, lo=40, hi=40)[0]


@pytest.fixture(scope="module")
def llm(converted: dict[str, Path]) -> LLM:
    return LLM(str(converted["llama"]), kv_cache_dtype="fp32")  # compared with transformers


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def free_run(llm: LLM) -> tuple[list[int], str]:
    out = llm.generate([PROMPT], greedy(skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    return out.token_ids, out.text


def _token_texts(llm: LLM, ids: list[int]) -> list[str]:
    """Text after each token, as the tokens are decoded together, less an unfinished
    character at the end (which is not text yet)."""
    tok = llm.llm_engine.tokenizer
    return [tok.decode(ids[:i + 1], False).rstrip("\ufffd") for i in range(len(ids))]


def test_stop_string_spanning_two_tokens(llm: LLM, free_run: tuple[list[int], str]) -> None:
    ids, text = free_run
    texts = _token_texts(llm, ids)
    k = next(i for i in range(1, len(ids)) if len(texts[i - 1]) >= 2
             and len(texts[i]) > len(texts[i - 1]))
    stop = text[len(texts[k - 1]) - 1:len(texts[k - 1]) + 1]  # last char of k-1, first of k
    cut = text.find(stop)
    params = greedy(stop=[stop], skip_special_tokens=False)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (text[:cut], "stop", stop)
    done = next(i for i, t in enumerate(texts) if len(t) >= cut + len(stop))
    assert out.token_ids == ids[:done + 1]
    params = greedy(stop=[stop], include_stop_str_in_output=True, skip_special_tokens=False)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut + len(stop)]


def test_stop_string_at_the_very_start(llm: LLM, free_run: tuple[list[int], str]) -> None:
    _, text = free_run
    out = llm.generate([PROMPT], greedy(stop=[text[:1]], skip_special_tokens=False),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "" and out.finish_reason == "stop" and len(out.token_ids) == 1


def test_first_completed_stop_string_wins(llm: LLM, free_run: tuple[list[int], str]) -> None:
    ids, text = free_run
    ends = [len(t) for t in _token_texts(llm, ids)]
    # `early` ends with token k, `late` overlaps it and ends with token k + 1.
    k = next(k for k in range(1, len(ends) - 1)
             if ends[k - 1] >= 1 and ends[k] >= ends[k - 1] + 2 and ends[k + 1] > ends[k]
             and text.find(text[ends[k] - 2:ends[k]]) == ends[k] - 2)
    early, late = text[ends[k] - 2:ends[k]], text[ends[k] - 1:ends[k + 1]]
    params = greedy(stop=[late, early], skip_special_tokens=False)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert out.stop_reason == early and out.text == text[:ends[k] - 2]
    assert out.token_ids == ids[:k + 1]


def test_stop_token_ids_and_min_tokens(llm: LLM, free_run: tuple[list[int], str]) -> None:
    ids, _ = free_run
    out = llm.generate([PROMPT], greedy(stop_token_ids=[ids[2]]), use_tqdm=False)[0].outputs[0]
    first = ids.index(ids[2])
    assert out.token_ids == ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", ids[2])
    # min_tokens: the stop id is suppressed until 5 tokens exist.
    out = llm.generate([PROMPT], greedy(stop_token_ids=[ids[0]], min_tokens=5),
                       use_tqdm=False)[0].outputs[0]
    assert ids[0] not in out.token_ids[:5] and len(out.token_ids) >= 5


def test_multibyte_text_never_shows_replacement_characters(llm: LLM) -> None:
    tok = llm.llm_engine.tokenizer
    text = "東京 🙂 café naïve"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()) + 3  # characters really are split across tokens
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    pieces = [detok.step(t) for t in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def _reference_logprobs(hf_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_logprobs_equal_transformers(llm: LLM, hf_models: dict[str, Path]) -> None:
    out = llm.generate([PROMPT], greedy(logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.outputs[0].token_ids
    ref = _reference_logprobs(hf_models["llama"], PROMPT + ids)
    for i, (token, lps) in enumerate(zip(ids, out.outputs[0].logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert len(lps) == 3 + (token not in np.argsort(-row)[:3])
        for t, lp in lps.items():
            assert abs(lp.logprob - row[t]) < 1e-4
        assert set(np.argsort(-row)[:3]) <= set(lps)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        assert abs(out.prompt_logprobs[p][PROMPT[p]].logprob - ref[p - 1][PROMPT[p]]) < 1e-4


def test_prompt_logprobs_survive_chunked_prefill(converted: dict[str, Path],
                                                 llm: LLM) -> None:
    chunked = LLM(str(converted["llama"]), max_num_batched_tokens=16, kv_cache_dtype="fp32")
    a = chunked.generate([PROMPT], greedy(prompt_logprobs=0), use_tqdm=False)[0]
    b = llm.generate([PROMPT], greedy(prompt_logprobs=0), use_tqdm=False)[0]
    assert len(a.prompt_logprobs) == len(PROMPT)
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x.keys() == y.keys()
        assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_seed_gives_the_same_tokens_alone_and_in_a_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded, use_tqdm=False)[0].outputs[0].token_ids
    prompts = random_prompts(3, seed=11)
    batch = llm.generate([prompts[0], PROMPT, prompts[1]], [other, seeded, other],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    runs = [llm.generate([PROMPT], other, use_tqdm=False)[0].outputs[0].token_ids
            for _ in range(2)]
    assert runs[0] != runs[1]


def test_n_samples_share_one_prefill(converted: dict[str, Path]) -> None:
    llm = LLM(str(converted["llama"]))
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    samples = [o.token_ids for o in out.outputs]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(s) for s in samples}) == 4
    # The 40-token prompt: 2 full blocks of 16 are computed once and reused by the 3 others,
    # which recompute only the last 8 tokens.
    engine = llm.llm_engine
    assert engine.block_manager.prefix_hits == 3 * 2
    assert engine.num_prefill_tokens == len(PROMPT) + 3 * 8
    again = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == samples


def test_chat_applies_the_template(llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    out = llm.chat(messages, greedy(), use_tqdm=False)[0]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert out.prompt == expected
    assert out.prompt_token_ids == llm.llm_engine.tokenizer.encode(expected, False)
    two = llm.chat([messages, messages[1:]], greedy(), use_tqdm=False)
    assert two[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert len(two) == 2


def test_fp16_kv_cache_stays_within_rounding_of_transformers(converted: dict[str, Path],
                                                             hf_models: dict[str, Path],
                                                             llm: LLM) -> None:
    fp16 = LLM(str(converted["llama"]))  # the default cache dtype
    assert fp16.llm_engine.kv_cache.dtype == np.float16
    # Half the bytes per token: the same budget holds twice the blocks.
    assert (fp16.llm_engine.block_manager.num_blocks
            == 2 * llm.llm_engine.block_manager.num_blocks)
    out = fp16.generate([PROMPT], greedy(logprobs=0, prompt_logprobs=0), use_tqdm=False)[0]
    ids = out.outputs[0].token_ids
    ref = _reference_logprobs(hf_models["llama"], PROMPT + ids)
    for p in range(1, len(PROMPT)):
        assert abs(out.prompt_logprobs[p][PROMPT[p]].logprob - ref[p - 1][PROMPT[p]]) < 1e-2
    for i, (token, lps) in enumerate(zip(ids, out.outputs[0].logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert abs(lps[token].logprob - row[token]) < 1e-2
        assert row[token] > row.max() - 1e-2  # greedy: the best token, or all but tied
