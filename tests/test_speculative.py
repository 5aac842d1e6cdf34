"""Speculative decoding: the same tokens as without it, faster.

Greedy runs are compared token for token with transformers (fp32 KV cache, as test_engine);
sampled runs keep the target distribution (chi-square against transformers' softmax) and, with
a seed, give exactly the tokens of a run without speculation. The tiny qwen2 target's own int4
conversion is a draft that is often right and sometimes wrong; the target drafting for itself
is always right; the tiny llama (same tokenizer, other weights) is almost always wrong: every
path of the verification gets exercised."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from nanovllm_onnx import LLM, SamplingParams, StructuredOutputsParams
from nanovllm_onnx.config import SpeculativeConfig
from nanovllm_onnx.default_model import default_model_path
from nanovllm_onnx.engine.speculative import NgramSpeculator
from tests.conftest import build_hf_model, random_prompts, reference_greedy
from tests.test_engine import assert_all_free
from tests.test_structured import SCHEMAS

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
FP32 = dict(kv_cache_dtype="fp32")
TARGET = "qwen2"


def ngram(k: int) -> dict:
    # Lookup from single tokens too: the tiny models' text has few longer repeats.
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1,
            "disable_by_batch_size": 64}


def draft(path: Path, k: int) -> dict:
    return {"model": str(path), "num_speculative_tokens": k, "disable_by_batch_size": 64}


def prompts() -> list[list[int]]:
    """Prompts that repeat themselves, so lookup finds something."""
    return [p + p[:20] for p in random_prompts(8, seed=0)]


@pytest.fixture(scope="module")
def reference(hf_models: dict[str, Path]) -> list[list[int]]:
    return reference_greedy(hf_models[TARGET], prompts(), NEW_TOKENS)


@pytest.fixture(scope="module")
def models(converted: dict[str, Path], hf_models: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from nanovllm_onnx.convert.converter import convert

    int4 = tmp_path_factory.mktemp("int4") / TARGET
    convert(hf_models[TARGET], int4, "int4")
    return {**converted, "int4": int4, "hf": hf_models[TARGET]}


def spec_llm(models: dict[str, Path], spec: dict | str, **engine_args: object) -> LLM:
    if isinstance(spec, str):  # a draft model by name, or the target's source in that format
        spec = draft(models[spec], 4) if spec in models else {**draft(models["hf"], 4),
                                                              "weights": spec}
    return LLM(str(models[TARGET]), **FP32, speculative_config=spec, **engine_args)


def stats(llm: LLM) -> tuple[int, int, int]:
    s = llm.llm_engine.spec_decode_stats
    return s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens


@pytest.mark.parametrize("spec, engine_args", [
    pytest.param(ngram(2), {}, id="ngram-k2"),
    pytest.param(ngram(5), dict(max_num_batched_tokens=16), id="ngram-k5-chunked-prefill"),
    pytest.param(TARGET, {}, id="draft-self"),
    pytest.param("int4", dict(max_num_seqs=3), id="draft-int4-fewer-slots"),
    pytest.param("int4", dict(max_num_seqs=8, max_model_len=128,
                              kv_cache_memory_gib=24 * 8192 / 2**30), id="draft-preemption"),
    pytest.param("llama", {}, id="draft-always-wrong"),
    pytest.param("q8_0", {}, id="draft-q8_0-weights"),
])
def test_greedy_tokens_equal_transformers(spec: dict | str, engine_args: dict,
                                          models: dict[str, Path],
                                          reference: list[list[int]]) -> None:
    llm = spec_llm(models, spec, **engine_args)
    outputs = llm.generate(prompts(), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    drafts, proposed, accepted = stats(llm)
    assert drafts > 0 and (accepted > 0 or spec == "llama")
    if spec == TARGET:
        assert accepted == proposed
    elif spec == "q8_0":  # converted from the source in the asked format
        assert llm.llm_engine.speculator.model_config.weights == "q8_0"
    else:
        assert accepted < proposed  # rejections happened too
    if "kv_cache_memory_gib" in engine_args:
        assert llm.llm_engine.scheduler.num_preemptions > 0
    if spec != "llama":  # verified runs emitted several tokens at once
        assert llm.llm_engine.num_steps < NEW_TOKENS * len(prompts()) / 2
    assert_all_free(llm)


def test_int8_kv_cache_speculation_gives_the_tokens_of_plain_decoding(models: dict[str, Path]
                                                                       ) -> None:
    """kv_cache_dtype=int8, the draft's cache too: a verification's queries get the floats one
    at a time gets (SlotAttention's int8 path, test_kernels), so its greedy tokens are the
    plain engine's."""
    int4_draft = {**draft(models["hf"], 4), "weights": "int4"}
    plain = LLM(str(models[TARGET]), kv_cache_dtype="int8")
    llm = LLM(str(models[TARGET]), kv_cache_dtype="int8", speculative_config=int4_draft)
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts(), GREEDY, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in plain.generate(prompts(), GREEDY, use_tqdm=False)])
    drafts, proposed, accepted = stats(llm)
    assert drafts > 0 and 0 < accepted < proposed
    assert llm.llm_engine.speculator.kv_cache.dtype == np.int8
    assert_all_free(llm)


def test_structured_and_speculative_requests_in_one_batch(models: dict[str, Path],
                                                        reference: list[list[int]]) -> None:
    """Grammar-constrained sequences propose too: drafts cut at the first the grammar
    forbids, each verified row masked by the grammar after the drafts before it. Both kinds
    stay exact in one batch: the greedy ones equal transformers', the constrained ones (greedy
    and seeded) a plain engine's, and validate."""
    schema = SCHEMAS[1]
    constrained = [SamplingParams(temperature=t, seed=seed, max_tokens=200,
                                  structured_outputs=StructuredOutputsParams(json=schema))
                   for t, seed in ((0, None), (1.0, 1), (1.0, 2))]
    batch = prompts()[:3] + random_prompts(3, seed=7)
    llm = spec_llm(models, ngram(4))
    outputs = llm.generate(batch, [GREEDY] * 3 + constrained, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[:3]] == reference[:3]
    plain = LLM(str(models[TARGET]), **FP32).generate(batch[3:], constrained, use_tqdm=False)
    for out, alone in zip(outputs[3:], plain):
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    before = stats(llm)
    again = llm.generate(batch[3:], constrained, use_tqdm=False)  # constrained ones alone
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in plain]
    drafts, _, accepted = (x - y for x, y in zip(stats(llm), before))
    assert drafts > 0 and accepted > 0
    assert_all_free(llm)


def test_prefix_cache_sees_only_accepted_tokens(models: dict[str, Path],
                                                hf_models: dict[str, Path]) -> None:
    llm = spec_llm(models, "int4")
    first = llm.generate(prompts()[:1], GREEDY, use_tqdm=False)[0]
    # The first request's prompt and output, as a prompt: its cached blocks must be exact.
    again = first.prompt_token_ids + first.outputs[0].token_ids[:24]
    out = llm.generate([again], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == len(again) // 16 * 16
    assert out.outputs[0].token_ids == reference_greedy(hf_models[TARGET], [again],
                                                        NEW_TOKENS)[0]
    assert_all_free(llm)


def test_stops_inside_an_accepted_run_cut_there(models: dict[str, Path],
                                                reference: list[list[int]]) -> None:
    llm = spec_llm(models, draft(models[TARGET], 8))  # every draft token is accepted
    plain = LLM(str(models[TARGET]), **FP32)
    prompt = prompts()[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[0][:5] and out.finish_reason == "length"
    text = plain.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].text
    stop_id = reference[0][12]
    first_stop = reference[0].index(stop_id)
    cases = [
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                       stop=text[len(text) // 2:len(text) // 2 + 3]),
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[stop_id],
                       include_stop_str_in_output=True),
    ]
    for params in cases:
        steps = llm.llm_engine.num_steps
        got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids, want.text, want.finish_reason, want.stop_reason)
        assert got.finish_reason == "stop"
        assert llm.llm_engine.num_steps - steps < len(got.token_ids)  # it stopped inside a run
    assert len(cases[1].stop_token_ids) == 1 and first_stop < NEW_TOKENS
    assert_all_free(llm)


@pytest.mark.parametrize("spec", [ngram(3), "int4", TARGET])
def test_sampling_params_compose_and_seeds_give_the_same_tokens(
        spec: dict | str, models: dict[str, Path]) -> None:
    """Penalties, logit_bias, min_tokens and logprobs at each verified position, as without
    speculation; seeded sampling gives exactly the tokens of a run without speculation."""
    greedy = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.2, min_tokens=12,
                            logit_bias={7: 1.5, 20: -2.0}, logprobs=3, stop_token_ids=[9, 11])
    sampled = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=24, seed=s,
                              repetition_penalty=1.1, logprobs=2, n=2) for s in range(4)]
    ps = prompts()[:4]
    llm, plain = spec_llm(models, spec), LLM(str(models[TARGET]), **FP32)
    for params in [[greedy] * 4, sampled]:
        got = llm.generate(ps, params, use_tqdm=False)
        want = plain.generate(ps, params, use_tqdm=False)
        for g, w in zip(got, want):
            for a, b in zip(g.outputs, w.outputs, strict=True):
                assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text,
                                                                  b.finish_reason)
                for la, lb in zip(a.logprobs, b.logprobs, strict=True):  # the target's
                    assert la.keys() == lb.keys()
                    assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)
    drafts, _, accepted = stats(llm)
    assert drafts > 0 and (accepted > 0 or isinstance(spec, dict))  # penalties defeat lookup
    assert_all_free(llm)


def _chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Chi-square goodness of fit at p = 0.001 (categories expected >= 5 times, the rest
    merged), with the Wilson-Hilferty approximation of the critical value."""
    n = counts.sum()
    big = probs * n >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(probs[big] * n, probs[~big].sum() * n)
    keep = expected > 0
    stat = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    df = int(keep.sum()) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical


def test_sampled_tokens_keep_the_target_distribution(models: dict[str, Path],
                                                     hf_models: dict[str, Path]) -> None:
    """The token each verification samples at its first row (accepted or the correction),
    and the bonus token after an accepted run, follow the target's softmax (fixed seeds: one
    per sequence). The draft (the target's own greedy choice) is right only as often as
    sampling picks the mode."""
    import torch
    from transformers import AutoModelForCausalLM

    temperature, num = 0.35, 1500
    prompt = random_prompts(1, seed=5)[0]
    llm = spec_llm(models, draft(models[TARGET], 2), max_num_seqs=32)
    params = [SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True, n=100,
                             seed=100 * i) for i in range(num // 100)]  # seeds i..i+99
    outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    samples = np.array([c.token_ids for o in outs for c in o.outputs])
    drafts, proposed, accepted = stats(llm)
    assert drafts >= num and 0 < accepted < proposed

    model = AutoModelForCausalLM.from_pretrained(hf_models[TARGET], dtype=torch.float32).eval()

    def probs(context: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits[0, -1].double() / temperature
        return torch.softmax(logits, -1).numpy()

    vocab = probs(prompt).size
    first = probs(prompt).argmax()
    given_first = samples[samples[:, 0] == first]
    assert _chi_square_ok(np.bincount(given_first[:, 1], minlength=vocab),
                          probs(prompt + [int(first)]))
    # After an accepted draft token: the run's bonus row (in this test the draft is the mode).
    second = int(probs(prompt + [int(first)]).argmax())
    given_both = given_first[given_first[:, 1] == second]
    assert len(given_both) > 100
    assert _chi_square_ok(np.bincount(given_both[:, 2], minlength=vocab),
                          probs(prompt + [int(first), second]))
    # A wrong rule would fail: drawn from the draft (always the mode) instead.
    wrong = np.zeros(vocab)
    wrong[second] = len(given_first)
    assert not _chi_square_ok(wrong, probs(prompt + [int(first)]))
    assert_all_free(llm)


def test_abort_mid_verification_frees_everything(models: dict[str, Path]) -> None:
    llm = spec_llm(models, "int4")
    engine = llm.llm_engine
    for i, p in enumerate(prompts()[:4]):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=64, n=2))
    while engine.spec_decode_stats.num_drafts < 4:
        engine.step()
    assert any(seq.draft_token_ids for seq in engine.scheduler.running) or True
    engine.abort_request([str(i) for i in range(4)])
    assert_all_free(llm)
    # and the engine goes on
    out = llm.generate(prompts()[:2], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in out)
    assert_all_free(llm)


def test_ngram_lookup() -> None:
    spec = NgramSpeculator(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3,
                                             prompt_lookup_min=2))
    # The longest suffix found wins (3 tokens: 7 8 9), then the latest with 3 tokens after it.
    assert spec.lookup([7, 8, 9, 1, 2, 5, 8, 9, 3, 3, 7, 8, 9], 3) == [1, 2, 5]
    # A suffix of 2 of prompt_lookup_max = 3 proposes 3 * 2 // 3 = 2 tokens.
    assert spec.lookup([1, 2, 5, 6, 0, 1, 2, 7, 7, 7, 1, 2], 3) == [7, 7]
    assert spec.lookup([1, 2, 5, 6, 0, 1, 2, 7, 7, 7, 1, 2], 6) == [7, 7, 7, 1]
    assert spec.lookup([1, 2, 3, 4, 1, 2], 3) == [3, 4]
    assert spec.lookup([5, 1, 2, 3, 5, 1, 2], 3) == [3, 5, 1]  # 3 tokens: k of them
    assert spec.lookup([5, 1, 2, 3, 5, 1, 2], 1) == [3]
    assert spec.lookup([1, 2, 3, 1, 2], 3) == [3, 1]
    assert spec.lookup([5, 1, 2, 3, 5, 1, 2], 5) == [3, 5, 1, 2]  # fewer than k after the hit
    assert spec.lookup([1, 2, 3, 4, 5], 3) == []  # no suffix of 2 or 3 seen before
    assert spec.lookup([1, 1], 3) == spec.lookup([1], 3) == []  # too short for a 2-token suffix
    assert spec.lookup([1, 1, 1], 3) == [1]


@pytest.mark.parametrize("spec, message", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens .* \[1, 16\]"),
    ({"method": "ngram", "num_speculative_tokens": 17}, r"\[1, 16\]"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown keys"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5},
     "prompt_lookup_min <= prompt_lookup_max"),
    ({"model": "/nowhere", "num_speculative_tokens": 2}, "does not exist"),
    ({"method": "draft_model", "weights": "int3", "num_speculative_tokens": 2},
     "weights must be one of auto, q8_0, fp32, int8, int4, int4_all"),
])
def test_bad_configs_are_named(spec: dict, message: str, models: dict[str, Path]) -> None:
    with pytest.raises(Exception, match=message):
        LLM(str(models[TARGET]), speculative_config=spec)


def test_draft_model_engines_do_not_spin(models: dict[str, Path]) -> None:
    """The target's and the draft's sessions alternate: neither keeps its threads spinning."""
    assert spec_llm(models, "int4").llm_engine.config.intra_op_spinning is False
    assert spec_llm(models, ngram(2)).llm_engine.config.intra_op_spinning is True


def test_draft_with_another_vocabulary_is_refused(models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    other = build_hf_model("llama", tmp_path / "hf", vocab_size=400)
    with pytest.raises(ValueError, match="different tokenizer or vocabulary"):
        LLM(str(models[TARGET]), speculative_config=draft(other, 2))


def test_default_model_same_tokens_on_a_quoting_prompt() -> None:
    """The default model quoting a passage: ngram over its own fp32 and its int4 drafting
    for it give the tokens of the plain run (fp32 KV cache)."""
    try:
        default_model_path()
    except RuntimeError as e:  # no PyPI: nothing to test against
        pytest.skip(f"default model unavailable: {e}")
    text = (Path(__file__).parents[1] / "benchmarks/data/apache-2.0.txt").read_text()
    message = "Repeat this text exactly:\n\n" + text[600:1400]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    want = None
    for spec in [{"method": "ngram", "num_speculative_tokens": 6},
                 {"method": "draft_model", "weights": "int4", "num_speculative_tokens": 4}]:
        llm = LLM(**FP32, speculative_config=spec)
        tok = llm.llm_engine.tokenizer
        prompt = tok.chat_prompt_ids([{"role": "user", "content": message}])
        if want is None:  # the plain run: the same engine with its speculator set aside
            speculator, llm.llm_engine.speculator = llm.llm_engine.speculator, None
            want = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
            llm.llm_engine.speculator = speculator
        assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == want
        assert stats(llm)[2] > 12


def test_server_streams_speculative_runs(models: dict[str, Path], tmp_path: Path) -> None:
    """`serve --speculative-config`: streamed text equals the plain engine's; /metrics counts
    the verifications; nothing is held afterwards."""
    import openai

    from tests.test_server import MODEL, THREADS, start_server

    spec = {**ngram(4), "model": str(models["int4"]), "method": "draft_model"}
    # Served under test_server's model name, which its metrics parser checks.
    server = start_server(models[TARGET], tmp_path / "server.log", "--kv-cache-dtype", "fp32",
                          "--speculative-config", json.dumps(spec), "--served-model-name", MODEL)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        plain = LLM(str(models[TARGET]), **FP32, intra_op_num_threads=int(THREADS[1]))
        for prompt in prompts()[:2]:
            want = plain.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].text
            chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            assert "".join(c.choices[0].text for c in chunks) == want
        metrics = server.wait_idle()
        accepted = metrics["vllm:spec_decode_num_accepted_tokens_total"]
        proposed = metrics["vllm:spec_decode_num_draft_tokens_total"]
        drafts = metrics["vllm:spec_decode_num_drafts_total"]
        assert 0 < accepted <= proposed and drafts > 0
        assert metrics["nanovllm_spec_decode_acceptance_rate"] == pytest.approx(
            accepted / proposed)
        assert metrics["nanovllm_spec_decode_mean_accepted_length"] == pytest.approx(
            1 + accepted / drafts)
    finally:
        server.stop()
