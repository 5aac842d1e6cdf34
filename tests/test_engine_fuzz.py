"""The engine API under random interleavings of add_request, step and abort_request with
random sampling parameters (hypothesis): every request not aborted finishes as its parameters
say, and the block, slot and prefix-cache accounting returns to empty."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanovllm_onnx import LLM, SamplingParams
from tests.conftest import VOCAB
from tests.test_engine import assert_all_free

EXAMPLES = 40
EOS = 4  # the tiny models' EOS

sampling_params = st.builds(
    SamplingParams,
    n=st.integers(1, 3),
    temperature=st.sampled_from([0.0, 0.7, 1.5]),
    top_p=st.sampled_from([1.0, 0.8]),
    top_k=st.sampled_from([0, 1, 20]),
    min_p=st.sampled_from([0.0, 0.2]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    presence_penalty=st.sampled_from([0.0, 1.0]),
    seed=st.none() | st.integers(0, 2**31),
    stop=st.none() | st.sampled_from(["e", ["o", "Th"]]),
    stop_token_ids=st.lists(st.integers(5, VOCAB - 1), max_size=2),
    ignore_eos=st.booleans(),
    max_tokens=st.integers(1, 24),
    min_tokens=st.integers(0, 1),
    logprobs=st.none() | st.integers(0, 2),
    prompt_logprobs=st.none() | st.just(1),
)
SHARED = list(range(100, 120))  # a prefix some prompts share: a full block to cache
prompts = st.builds(lambda prefix, tail: prefix + tail, st.sampled_from([[], SHARED]),
                    st.lists(st.integers(5, VOCAB - 1), min_size=1, max_size=30))
actions = st.lists(st.one_of(
    st.tuples(st.just("add"), prompts, sampling_params),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 100)),
), min_size=1, max_size=25)


@pytest.fixture(scope="module")
def llm(converted: dict[str, Path]) -> LLM:
    # Few slots, chunked prefill and a KV cache small enough to preempt: every path runs.
    # A token's K/V: 2 layers x (K, V) x 2 heads x 16 dims x 2 bytes (fp16) = 256 bytes.
    return LLM(str(converted["llama"]), max_num_seqs=3, max_num_batched_tokens=24,
               max_model_len=64, kv_cache_memory_gib=5 * 16 * 256 / 2**30)


def test_random_add_step_abort_finishes_every_request_and_frees_everything(llm: LLM) -> None:
    engine = llm.llm_engine
    assert engine.block_manager.num_blocks == 5  # 1.25 sequences of max_model_len: preempts

    @given(actions)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(script: list[tuple]) -> None:
        added: dict[str, SamplingParams] = {}
        aborted: set[str] = set()
        finished = {}

        def step() -> None:
            for out in engine.step():
                assert out.request_id not in aborted and out.request_id not in finished
                if out.finished:
                    finished[out.request_id] = out

        for action in script:
            if action[0] == "add":
                request_id = engine.new_request_id()
                engine.add_request(request_id, action[1], action[2])
                added[request_id] = action[2]
            elif action[0] == "step":
                for _ in range(action[1]):
                    step()
            elif added:
                request_id = sorted(added)[action[1] % len(added)]
                if request_id not in finished:
                    engine.abort_request(request_id)
                    aborted.add(request_id)
        for _ in range(2000):
            if not engine.has_unfinished_requests():
                break
            step()
        assert set(finished) == set(added) - aborted
        for request_id, out in finished.items():
            params = added[request_id]
            assert len(out.outputs) == params.n
            room = engine.max_model_len - len(out.prompt_token_ids)
            for choice in out.outputs:
                tokens = choice.token_ids
                assert 1 <= len(tokens) <= min(params.max_tokens, room)
                if choice.finish_reason == "length":
                    assert len(tokens) == min(params.max_tokens, room)
                else:
                    assert choice.finish_reason == "stop"
                    stopped_by = tokens[-1] in params.stop_token_ids or (
                        tokens[-1] == EOS and not params.ignore_eos) or choice.stop_reason
                    assert stopped_by and len(tokens) >= params.min_tokens
                if params.logprobs is not None:
                    assert len(choice.logprobs) == len(tokens)
            if params.prompt_logprobs is not None:
                assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
        assert_all_free(llm)

    check()
    # The paths it meant to reach were reached.
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_hits > 0
