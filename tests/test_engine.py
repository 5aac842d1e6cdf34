"""Greedy tokens equal transformers' however the requests are batched, cached or preempted.

Token-exact comparisons run the KV cache in fp32, transformers' precision here, or in int8
against transformers reading keys and values rounded as the int8 cache rounds them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nanovllm_onnx import LLM, LLMEngine, SamplingParams
from nanovllm_onnx.engine.sequence import Sequence
from nanovllm_onnx.runner.kv_cache import KVCache
from nanovllm_onnx.runner.model_runner import StepInput
from tests.conftest import random_prompts, reference_greedy

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
FP32 = dict(kv_cache_dtype="fp32")


def assert_all_free(llm: LLM) -> None:
    engine = llm.llm_engine
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert bm.num_seq_blocks == 0
    assert sorted(bm.free_slots) == list(range(engine.config.max_num_seqs))
    assert bm.num_free_blocks + len(bm.cached) == bm.num_blocks


@pytest.fixture(scope="module")
def references(hf_models: dict[str, Path]) -> dict[str, list[list[int]]]:
    prompts = random_prompts(8, seed=0)
    return {name: reference_greedy(folder, prompts, NEW_TOKENS)
            for name, folder in hf_models.items()}


@pytest.mark.parametrize("name", ["llama", "llama_tied", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_transformers(name: str, converted: dict[str, Path],
                                     references: dict[str, list[list[int]]]) -> None:
    llm = LLM(str(converted[name]), **FP32)
    outputs = llm.generate(random_prompts(8, seed=0), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == references[name]
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert_all_free(llm)


@pytest.mark.parametrize("engine_args", [
    pytest.param(dict(max_num_seqs=3), id="fewer-slots-than-requests"),
    pytest.param(dict(max_num_batched_tokens=16), id="chunked-prefill"),
    pytest.param(dict(max_num_seqs=8, max_model_len=128, kv_cache_memory_gib=24 * 8192 / 2**30),
                 id="preemption"),
    pytest.param(dict(enable_prefix_caching=False), id="no-prefix-cache"),
])
def test_batching_variants_give_the_same_tokens(engine_args: dict, converted: dict[str, Path],
                                                references: dict[str, list[list[int]]]) -> None:
    llm = LLM(str(converted["qwen2"]), **FP32, **engine_args)
    engine = llm.llm_engine
    steps = record_steps(engine)
    outputs = llm.generate(random_prompts(8, seed=0), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == references["qwen2"]
    if "max_num_batched_tokens" in engine_args:
        # No step ran more than the budget, and prompts were cut into chunks: some step ran
        # part of a prompt on top of the part a step before it computed.
        assert max(sum(n for _, _, n in step) for step in steps) <= 16
        assert any(0 < done < prompt and n > 1 for step in steps for done, prompt, n in step)
    if "kv_cache_memory_gib" in engine_args:
        assert engine.scheduler.num_preemptions > 0
    assert_all_free(llm)


def record_steps(engine: LLMEngine) -> list[list[tuple[int, int, int]]]:
    """Every step the model runs, as (tokens computed before, prompt tokens, tokens now) per
    sequence."""
    steps: list[list[tuple[int, int, int]]] = []
    run = engine.runner.run

    def recording_run(step):  # noqa: ANN001, ANN202
        steps.append([(seq.num_computed_tokens, seq.num_prompt_tokens, n)
                      for seq, n in zip(step.seqs, step.num_tokens)])
        return run(step)

    engine.runner.run = recording_run
    return steps


def test_prefix_cache_is_hit_and_exact(converted: dict[str, Path], hf_models: dict[str, Path]
                                       ) -> None:
    shared = random_prompts(1, seed=1, lo=70, hi=70)[0]  # 4 full blocks of 16 and a bit
    tails = random_prompts(6, seed=2, lo=1, hi=20)
    prompts = [shared + t for t in tails]
    expected = reference_greedy(hf_models["llama"], prompts, NEW_TOKENS)
    llm = LLM(str(converted["llama"]), **FP32)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    assert all(o.num_cached_tokens == 64 for o in rest)
    assert llm.llm_engine.block_manager.prefix_hits == 4 * len(rest)
    # The prompt computed by the model, without the cached blocks:
    assert llm.llm_engine.num_prefill_tokens == sum(len(p) for p in prompts) - 64 * len(rest)
    cold = LLM(str(converted["llama"]), enable_prefix_caching=False, **FP32)
    outs = cold.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert cold.llm_engine.block_manager.prefix_hits == 0
    assert_all_free(llm)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])  # auto: fp16
def test_prefix_cache_gives_the_tokens_of_a_cold_run(kv_cache_dtype: str,
                                                      converted: dict[str, Path]) -> None:
    """Cached fp16 or int8 K/V blocks (an int8 position's scale too) go into a slot (key tiles
    included) exactly as computed."""
    shared = random_prompts(1, seed=1, lo=70, hi=70)[0]
    prompts = [shared + t for t in random_prompts(4, seed=4, lo=1, hi=20)]
    warm = LLM(str(converted["qwen3"]), kv_cache_dtype=kv_cache_dtype)
    first = warm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = warm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert all(o.num_cached_tokens == 64 for o in rest)
    cold = LLM(str(converted["qwen3"]), enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype)
    expected = cold.generate(prompts, GREEDY, use_tqdm=False)
    assert ([o.outputs[0].token_ids for o in first + rest]
            == [o.outputs[0].token_ids for o in expected])


def int8_kv_attention() -> str:
    """transformers' sdpa attention reading its keys and values rounded as an int8 KV cache
    rounds them (per position and KV head, in float32: ops.cc's quantize_value), as an
    attn_implementation name: the reference for kv_cache_dtype=int8."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def rounded(x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().amax(-1, keepdim=True)
        inv = torch.where(peak > 0, 127 / peak, 0)
        return torch.round(x * inv) * (peak * torch.tensor(1 / 127, dtype=torch.float32))

    def attention(module, q, k, v, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return sdpa_attention_forward(module, q, rounded(k), rounded(v), *args, **kwargs)

    AttentionInterface.register("int8_kv", attention)
    return "int8_kv"


# 24 blocks of 16 tokens of the tiny models' int8 cache: 2 layers x K/V x 2 KV heads x (16 + 4)
INT8_24_BLOCKS = 24 * 16 * 2 * 2 * 2 * 20 / 2**30


@pytest.mark.parametrize("name, engine_args", [
    pytest.param("llama", dict(max_num_batched_tokens=48), id="llama-chunked-prefill"),
    pytest.param("qwen3", dict(max_num_seqs=8, max_model_len=128,
                               kv_cache_memory_gib=INT8_24_BLOCKS), id="qwen3-preemption"),
])
def test_int8_kv_cache_greedy_matches_transformers_on_its_rounding(
        name: str, engine_args: dict, converted: dict[str, Path], hf_models: dict[str, Path]
        ) -> None:
    """kv_cache_dtype=int8: transformers' tokens where its attention reads keys and values
    rounded as the cache keeps them, through chunked prefill, batched decodes and recomputation
    after preemption; the cache holds its tokens in head_dim + 4 bytes a position and KV head
    (fp16: 2 x head_dim)."""
    prompts = random_prompts(8, seed=0)
    expected = reference_greedy(hf_models[name], prompts, NEW_TOKENS,
                                attn_implementation=int8_kv_attention())
    llm = LLM(str(converted[name]), kv_cache_dtype="int8", **engine_args)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    mc, engine = llm.llm_engine.model_config, llm.llm_engine
    block_bytes = engine.config.block_size * mc.num_layers * 2 * mc.num_kv_heads * (mc.head_dim + 4)
    assert engine.block_manager.num_blocks == int(engine.config.kv_cache_memory_gib * 2**30
                                                  ) // block_bytes
    if "kv_cache_memory_gib" in engine_args:
        assert engine.block_manager.num_blocks == 24
        assert engine.scheduler.num_preemptions > 0
    assert_all_free(llm)


def test_default_step_budget_chunks_prompts_beside_decodes(converted: dict[str, Path]) -> None:
    """The default budget (1024 tokens a step): running sequences first, one token each when
    they decode, then prompts in arrival order, the last one cut to what is left."""
    llm = LLM(str(converted["llama"]), **FP32)
    engine = llm.llm_engine
    for i, prompt in enumerate(random_prompts(4, seed=3, lo=600, hi=600)):
        engine.add_request(str(i), prompt, GREEDY)
    computed = []
    for _ in range(3):
        engine.step()
        computed.append([seq.num_computed_tokens for seq in engine.scheduler.running])
    assert computed == [[600, 424],  # 1024: the first prompt whole, the second's first chunk
                        [601, 600, 600, 247],  # a decode, the second's 176, the third, 247
                        [602, 601, 601, 600]]  # 3 decodes, the fourth's last 353


def test_abort_frees_everything(converted: dict[str, Path],
                                references: dict[str, list[list[int]]]) -> None:
    llm = LLM(str(converted["llama"]), max_num_seqs=2, **FP32)
    engine = llm.llm_engine
    for i, prompt in enumerate(random_prompts(8, seed=0)[:4]):
        engine.add_request(str(i), prompt, GREEDY)
    engine.step()
    engine.step()
    assert engine.scheduler.running and engine.scheduler.waiting
    engine.abort_request(["0", "2"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id in {"1", "3"}
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    # The others go on as if the aborted ones had never been there.
    assert finished == {"1": references["llama"][1], "3": references["llama"][3]}
    assert_all_free(llm)


def test_generate_raises_when_nothing_can_run(converted: dict[str, Path]) -> None:
    """A request that can never be scheduled is an error, not an endless loop."""
    llm = LLM(str(converted["llama"]))
    bm = llm.llm_engine.block_manager
    bm.can_allocate = lambda blocks: False  # as if the KV cache were full for good
    with pytest.raises(RuntimeError, match="2 requests cannot progress"):
        llm.generate(random_prompts(2, seed=0), GREEDY, use_tqdm=False)


def test_token_and_text_prompts(converted: dict[str, Path]) -> None:
    llm = LLM(str(converted["llama"]))
    tok = llm.llm_engine.tokenizer
    text = "The quick brown fox"
    by_text, by_ids, by_dict = llm.generate(
        [text, tok.encode(text), {"prompt_token_ids": tok.encode(text)}], GREEDY, use_tqdm=False)
    assert by_text.prompt == text and by_ids.prompt is None
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids == tok.encode(text)
    token_ids = [o.outputs[0].token_ids for o in (by_text, by_ids, by_dict)]
    assert token_ids[0] == token_ids[1] == token_ids[2]
    assert by_text.outputs[0].text == tok.decode(by_text.outputs[0].token_ids)


def test_requests_arriving_while_others_decode(converted: dict[str, Path],
                                               references: dict[str, list[list[int]]]) -> None:
    """Continuous batching: new prompts join steps that decode the running ones."""
    llm = LLM(str(converted["qwen2"]), max_num_seqs=4)
    engine = llm.llm_engine
    steps = record_steps(engine)
    prompts, results = random_prompts(8, seed=0), {}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
        for _ in range(3):  # a few steps before the next arrives
            for out in engine.step():
                if out.finished:
                    results[int(out.request_id)] = out.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
    assert [results[i] for i in range(8)] == references["qwen2"]
    tokens = [[n for _, _, n in step] for step in steps]
    assert sum(1 in step and any(n > 1 for n in step) for step in tokens) >= 5
    assert_all_free(llm)


def test_sharded_bfloat16_checkpoint(hf_models: dict[str, Path], tmp_path: Path) -> None:
    """Most HF checkpoints ship bfloat16, and from 3B up in shards (model-0000K-of-0000N
    with an index): read as float32, they give transformers' tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from nanovllm_onnx.convert.converter import convert

    model = AutoModelForCausalLM.from_pretrained(hf_models["qwen2"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    assert len(list((tmp_path / "bf16").glob("model-*-of-*.safetensors"))) > 2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / name).write_bytes((hf_models["qwen2"] / name).read_bytes())
    convert(tmp_path / "bf16", tmp_path / "onnx", "fp32")
    prompts = random_prompts(3, seed=5)
    expected = reference_greedy(tmp_path / "bf16", prompts, 8)  # loaded as float32 too
    out = LLM(str(tmp_path / "onnx"), **FP32).generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == expected


def rss_anon() -> int:
    """This process's resident anonymous memory in bytes (what the KV cache's pages are)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon:"))
               .split()[1]) * 1024


def test_freed_kv_pages_go_back_to_the_os() -> None:
    """A freed slot's and freed store blocks' pages leave the process's resident memory."""
    config = SimpleNamespace(num_layers=8, num_kv_heads=4, head_dim=64)
    blocks = 256  # a whole slot of 4096 positions, in blocks of 16
    cache = KVCache(config, num_slots=2, capacity=4096, num_blocks=blocks, block_size=16,
                    tiled_keys=True, dtype=np.dtype(np.float16))
    size = 8 * 2 * 4 * 4096 * 64 * 2  # layers x (K, V) x heads x positions x dims x bytes
    start = rss_anon()
    for i in range(config.num_layers):
        for array in cache.layer(i):
            array[1] = 1.0  # commits every page of slot 1
    filled = rss_anon()
    assert filled - start > 0.9 * size
    cache.copy_out([(1, b, b) for b in range(blocks)])  # all of it into the prefix store
    stored = rss_anon()
    assert stored - filled > 0.9 * size
    cache.release_slot(1)
    released = rss_anon()
    assert stored - released > 0.9 * size
    cache.release_store_blocks(list(range(blocks)))
    assert released - rss_anon() > 0.9 * size


def test_a_steps_tokens_are_prompt_tokens_by_position() -> None:
    """BlockLinear's prompt_rows: of a step's tokens, those below the prompt's length are
    prompt tokens (AMX's bf16 path), the others generated (int8 path): in a prefill chunk, in
    a recomputation after a preemption that runs past the prompt, a decode, drafts."""
    seq = Sequence("r", [1, 2, 3, 4, 5], SamplingParams())
    seq.token_ids += [6, 7]  # generated before a preemption
    cases = [(0, 3, 3), (3, 4, 2), (5, 2, 0), (6, 1, 0)]  # computed before, tokens now, prompt
    for computed, n, prompt in cases:
        seq.num_computed_tokens = computed
        assert StepInput([seq], [n]).num_prompt_tokens(0) == prompt
    seq.num_computed_tokens, seq.draft_token_ids = 7, [8, 9]
    assert StepInput([seq], [3]).num_prompt_tokens(0) == 0
