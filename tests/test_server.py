"""The OpenAI-compatible server: real server processes on 127.0.0.1, spoken to over real HTTP."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from nanovllm_onnx import LLM, EngineConfig, LLMEngine, SamplingParams
from nanovllm_onnx.outputs import CompletionOutput, RequestOutput
from nanovllm_onnx.server.api_server import serve
from nanovllm_onnx.server.async_engine import AsyncEngine
from nanovllm_onnx.server.metrics import ServerMetrics
from nanovllm_onnx.server.protocol import APIError
from nanovllm_onnx.server.serving import DONE, DeltaTracker, ResponseMeta, event_stream
from tests.conftest import VOCAB, random_prompts

MODEL = "llama"  # the served name: the converted folder's name
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMITED_CONTEXT = 128
START_TIMEOUT_S = 120
# One ONNX Runtime thread everywhere: the servers and the reference LLM then compute alike.
THREADS = ["--intra-op-num-threads", "1"]


@dataclass
class Server:
    url: str
    log: Path
    process: subprocess.Popen

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics").text)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once nothing runs or waits and no KV block is held by a sequence."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"]
                    == m["vllm:kv_cache_usage_perc"] == 0):
                return m
            assert time.monotonic() < deadline, f"the server did not go idle: {m}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def parse_metrics(text: str) -> dict[str, float]:
    """Each sample by its name and labels, less vLLM's model_name and engine labels, which
    every engine metric carries (checked here); process_* are the process's."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if sample.name == "vllm:cache_config_info":
                samples["num_blocks"] = float(labels["num_gpu_blocks"])
            elif not sample.name.startswith("process_"):
                assert labels.pop("model_name") == MODEL and labels.pop("engine") == "0"
            keys = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            samples[f"{sample.name}{{{keys}}}" if keys else sample.name] = sample.value
    return samples


def start_server(model: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                 launcher: Sequence[str] = ("-m", "nanovllm_onnx.cli")) -> Server:
    """`launcher`: python's arguments before `serve` (a script, to inject a fault)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, *launcher, "serve", str(model), "--port", str(port), *THREADS,
           *args]
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", log, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.1)


STATS_INTERVAL_S = 0.25  # the `server` fixture's engine stats lines


@pytest.fixture(scope="module")
def server(converted: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    s = start_server(converted[MODEL], tmp_path_factory.mktemp("server") / "server.log",
                     "--log-stats-interval", str(STATS_INTERVAL_S))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def limited(converted: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Server]:
    """Small limits, and the API key from the environment."""
    s = start_server(converted[MODEL], tmp_path_factory.mktemp("limited") / "server.log",
                     "--max-num-seqs", "1", "--max-waiting", "4", "--max-model-len",
                     str(LIMITED_CONTEXT), "--max-request-bytes", "65536",
                     env={"NANO_VLLM_ONNX_API_KEY": API_KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(converted: dict[str, Path]) -> LLM:
    return LLM(str(converted[MODEL]), intra_op_num_threads=1)


def client(server: Server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)


# ---- the official client -------------------------------------------------------------------

def test_openai_client_completion_and_chat(server: Server) -> None:
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]

    cmpl = c.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10, n=2,
                                temperature=0.9, seed=3, logprobs=2,
                                extra_body={"ignore_eos": True})
    assert [ch.index for ch in cmpl.choices] == [0, 1]
    assert cmpl.usage is not None and cmpl.usage.completion_tokens == 20
    for ch in cmpl.choices:
        assert ch.finish_reason == "length" and ch.logprobs is not None
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
        # The top 2 and the sampled token (which may be one of them), keyed by token text:
        # tokens that decode alike (byte pieces all read "\ufffd") share one entry.
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
        assert any(len(top) >= 2 for top in lp.top_logprobs)
        assert all(v <= 0 for v in lp.token_logprobs)

    chat = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_completion_tokens=8,
        n=2, seed=5, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert len(chat.choices) == 2 and chat.usage is not None
    assert chat.usage.completion_tokens == 16
    for ch in chat.choices:
        assert ch.message.role == "assistant" and isinstance(ch.message.content, str)
        assert ch.logprobs is not None and ch.logprobs.content is not None
        assert len(ch.logprobs.content) == 8
        for token in ch.logprobs.content:
            values = [t.logprob for t in token.top_logprobs]
            assert len(values) == 3 and values == sorted(values, reverse=True)
            assert token.logprob <= values[0]


def test_each_request_is_logged_once(server: Server) -> None:
    cmpl = client(server).completions.create(model=MODEL, prompt="Hello", max_tokens=3,
                                             extra_body={"ignore_eos": True})
    lines = [line for line in server.log.read_text().splitlines() if cmpl.id in line]
    assert len(lines) == 1 and " INFO " in lines[0]
    assert re.search(r"prompt_tokens=\d+ completion_tokens=3 ttft=\d+\.\d+s total=\d+\.\d+s "
                     r"finish=length", lines[0])


def _stream_texts(chunks: Any, chat: bool) -> tuple[dict[int, str], dict[int, str], Any, int]:
    """Text and finish reason per choice index, the usage, and the number of chunks."""
    texts: dict[int, str] = defaultdict(str)
    finish: dict[int, str] = {}
    usage, count = None, 0
    for chunk in chunks:
        count += 1
        usage = chunk.usage or usage
        for ch in chunk.choices:
            texts[ch.index] += (ch.delta.content or "") if chat else ch.text
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return dict(texts), finish, usage, count


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_streamed_text_equals_non_streamed(server: Server, chat: bool) -> None:
    c = client(server)
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=200, n=2, temperature=1.0, seed=11,
                              extra_body={"ignore_eos": True})
    if chat:
        kw["messages"] = [{"role": "user", "content": "Tell me a story"}]
        create: Callable[..., Any] = c.chat.completions.create
    else:
        kw["prompt"] = "Once upon a time"
        create = c.completions.create
    full = create(**kw)
    texts, finish, usage, count = _stream_texts(
        create(**kw, stream=True, stream_options={"include_usage": True}), chat)
    expected = {ch.index: (ch.message.content if chat else ch.text) for ch in full.choices}
    assert texts == expected
    assert finish == {0: "length", 1: "length"}
    assert usage == full.usage
    assert count > 3  # really streamed in pieces


def test_stop_strings_cut_the_same_streamed_or_not(server: Server, llm: LLM) -> None:
    prompt = "Paris is the capital"
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].text
    stop = greedy[20:23]
    expected = greedy[:greedy.find(stop)]
    c = client(server)
    # A long stop string that never matches makes the stream hold back more text.
    kw: dict[str, Any] = dict(model=MODEL, prompt=prompt, max_tokens=60, temperature=0,
                              stop=[stop, "never-in-the-output"],
                              extra_body={"ignore_eos": True})
    full = c.completions.create(**kw)
    assert full.choices[0].text == expected and full.choices[0].finish_reason == "stop"
    texts, finish, _, _ = _stream_texts(c.completions.create(**kw, stream=True), chat=False)
    assert texts == {0: expected} and finish == {0: "stop"}


def test_stream_holds_back_what_could_begin_a_stop_string() -> None:
    def output(text: str, finish: str | None = None) -> RequestOutput:
        return RequestOutput("r", None, [1], [CompletionOutput(0, text, [7] * len(text),
                                                               finish_reason=finish)],
                             finished=finish is not None)

    # As the engine reports it: growing text, then cut at the stop string "END".
    growing = ["ab", "abcE", "abcEN", "abcENd", "abcENdfooE", "abcENdfooEN"]
    final = "abcENdfoo"
    tracker = DeltaTracker(SamplingParams(stop=["END", "xyz"]))
    streamed = ""
    for text in growing:
        streamed += "".join(p.text for p in tracker.pieces([output(text)]))
        assert final.startswith(streamed)  # nothing sent is ever taken back
    pieces = tracker.pieces([output(final, "stop")])
    streamed += "".join(p.text for p in pieces)
    assert streamed == final and pieces[-1].finish_reason == "stop"
    assert tracker.pieces([output(final, "stop")]) == []  # a finished choice says nothing more


# ---- against the offline API -------------------------------------------------------------

def test_greedy_through_the_server_equals_llm_generate(server: Server, llm: LLM) -> None:
    c = client(server)
    greedy = SamplingParams(temperature=0, max_tokens=24)
    for prompt in ["The quick brown fox", "Hello world, how are"]:
        want = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
        got = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason
    ids = random_prompts(1, seed=2)[0]
    want = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0].outputs[0]
    got = c.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How are you?"}]
    want = llm.chat(messages, greedy, use_tqdm=False)[0].outputs[0]
    got_chat = c.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                         max_tokens=24, temperature=0)
    assert got_chat.choices[0].message.content == want.text


def test_64_concurrent_streams_complete_and_are_batched(server: Server, llm: LLM) -> None:
    prompts = random_prompts(64, seed=5)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    batched_before = _batched_steps(server.metrics())

    async def one(c: openai.AsyncOpenAI, prompt: list[int]) -> tuple[str, str | None]:
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=32,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                      max_retries=0) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(main())
    assert [text for text, _ in results] == expected
    assert all(finish == "length" for _, finish in results)
    metrics = server.wait_idle()
    assert _batched_steps(metrics) > batched_before  # some steps sampled several sequences


def _batched_steps(metrics: dict[str, float]) -> float:
    return metrics["nanovllm_batch_size_count"] - metrics['nanovllm_batch_size_bucket{le="1.0"}']


def test_metrics_count_what_a_request_did_under_vllms_names(server: Server) -> None:
    before = server.wait_idle()
    prompt = random_prompts(1, seed=9, lo=40, hi=40)[0]
    for _ in range(2):  # the second finds the prompt's 2 full blocks in the prefix cache
        httpx.post(f"{server.url}{COMPLETIONS}", json={
            "prompt": prompt, "max_tokens": 7, "n": 2, "seed": 1, "ignore_eos": True})
    after = server.wait_idle()

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("vllm:prompt_tokens_total") == 2 * 40
    assert grew("vllm:generation_tokens_total") == 2 * 2 * 7
    assert grew('vllm:request_success_total{finished_reason="length"}') == 2 * 2  # choices
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                      "vllm:request_time_per_output_token_seconds"):
        assert grew(f"{histogram}_count") == 2
        assert 0 < grew(f"{histogram}_sum") < 60
    assert grew("vllm:request_prompt_tokens_sum") == 2 * 40
    assert grew("vllm:request_generation_tokens_sum") == 2 * 2 * 7
    # Each of the 2 x 2 sequences waited between its 7 tokens 6 times.
    assert grew("vllm:inter_token_latency_seconds_count") == 2 * 2 * 6
    # In tokens, as vLLM counts them: the second request's 32 cached of its first 32 queried
    # (more when the first found blocks of earlier tests' prompts: never here, seed 9).
    assert grew("vllm:prefix_cache_hits_total") >= 32
    assert grew("vllm:prefix_cache_queries_total") >= grew("vllm:prefix_cache_hits_total")
    assert grew("nanovllm_engine_steps_total") >= 7
    assert after["process_resident_memory_bytes"] > 50 * 2**20
    assert after["num_blocks"] > after["nanovllm_prefix_cache_blocks"]
    assert after["nanovllm_prefix_cache_blocks"] >= 2


STATS_LINE = re.compile(
    r"Avg prompt throughput: (\d+\.\d) tokens/s, Avg generation throughput: (\d+\.\d) "
    r"tokens/s, Running: (\d+) reqs, Waiting: (\d+) reqs, KV cache usage: (\d+\.\d)%, "
    r"Prefix cache hit rate: (\d+\.\d)%$")


def test_stats_lines_give_the_computed_tokens_and_stop_once_idle(server: Server) -> None:
    server.wait_idle()
    time.sleep(3 * STATS_INTERVAL_S)  # the line that shows the engine idle is out
    start = len(server.log.read_text().splitlines())
    prompt = random_prompts(1, seed=11, lo=40, hi=40)[0]
    for _ in range(2):  # the second finds the prompt's 2 full blocks in the prefix cache
        httpx.post(f"{server.url}{COMPLETIONS}", json={
            "prompt": prompt, "max_tokens": 7, "n": 2, "seed": 1, "ignore_eos": True})
    server.wait_idle()
    time.sleep(3 * STATS_INTERVAL_S)
    lines = server.log.read_text().splitlines()[start:]
    stats = [tuple(map(float, m.groups())) for line in lines
             if (m := STATS_LINE.search(line)) and " INFO " in line]
    assert stats, lines
    # Each line averages over its interval: summed back, the tokens computed. Prompt tokens are
    # those the model ran: 40 for the first sequence, then for each of the 3 others (its
    # sample, and both of the second request) the 8 past the 2 cached blocks, not the 160
    # admitted; 3 of 4 sequences' 32 looked-up tokens hit.
    # (An interval runs past its nominal length on a busy machine, never short of it.)
    prompt_tokens = sum(s[0] for s in stats) * STATS_INTERVAL_S
    generated = sum(s[1] for s in stats) * STATS_INTERVAL_S
    assert 64 * 0.6 < prompt_tokens < 64 * 1.1, stats
    assert 2 * 2 * 7 * 0.6 < generated < 2 * 2 * 7 * 1.1, stats
    assert max(s[5] for s in stats) > 0  # the second request's hits, in the interval's rate
    # The last line shows the engine idle; none follows while it stays idle.
    assert stats[-1] == (0.0, 0.0, 0, 0, 0.0, 0.0)
    time.sleep(3 * STATS_INTERVAL_S)
    assert len(server.log.read_text().splitlines()) == start + len(lines)


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_a_stats_interval_that_is_not_positive_is_refused_before_loading(
        interval: float, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_stats_interval must be positive"):
        serve(EngineConfig(model=str(tmp_path / "missing")), MODEL, log_stats_interval=interval)


# ---- tokenize, detokenize, version ---------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tokenizer(hf_models: dict[str, Path]) -> Any:
    """transformers' tokenizer of the served checkpoint: the reference."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(hf_models[MODEL])


def test_tokenize_and_detokenize_agree_with_transformers(server: Server,
                                                         hf_tokenizer: Any) -> None:
    text = "Paris is the capital of France; café 東京 🙂"
    got = httpx.post(f"{server.url}/tokenize", json={
        "model": MODEL, "prompt": text, "return_token_strs": True}).json()
    ids = hf_tokenizer(text)["input_ids"]
    max_model_len = client(server).models.list().data[0].max_model_len
    assert got == {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
                   "token_strs": hf_tokenizer.convert_ids_to_tokens(ids)}
    # A conversation as the chat template renders it: the tokens a chat completion's usage
    # counts, special tokens included, which detokenize keeps.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    got = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    ids = hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert got["tokens"] == ids and got["token_strs"] is None
    chat = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat.usage is not None and chat.usage.prompt_tokens == len(ids)
    prompt = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert prompt == hf_tokenizer.decode(ids) and prompt.startswith("<|im_start|>system")
    assert httpx.get(f"{server.url}/version").json() == {
        "version": importlib.metadata.version("nano-vllm-onnx")}


@pytest.mark.parametrize(("body", "route", "param"), [
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "tokenize", "prompt"),
    ({}, "tokenize", "prompt"),
    ({"messages": []}, "tokenize", "messages"),
    ({"prompt": "x", "continue_final_message": True}, "tokenize", "continue_final_message"),
    ({"prompt": "\ud800"}, "tokenize", "prompt"),
    ({"prompt": "x", "model": "other"}, "tokenize", "model"),
    ({"tokens": [1, VOCAB]}, "detokenize", "tokens"),
    ({"tokens": [-1]}, "detokenize", "tokens"),
    ({"tokens": "abc"}, "detokenize", "tokens"),
])
def test_bad_tokenize_and_detokenize_requests_get_a_400_naming_the_field(
        server: Server, body: dict, route: str, param: str) -> None:
    r = httpx.post(f"{server.url}/{route}", content=json.dumps(body),  # (a lone surrogate)
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---- disconnects ---------------------------------------------------------------------------

LONG = {"prompt": "Hello", "max_tokens": 1000, "n": 32, "ignore_eos": True}


def _aborted(server: Server, generated_before: float, aborts_before: int) -> None:
    metrics = server.wait_idle()
    # Stopped early: fewer tokens than the 32 x 1000 asked for (the tiny model makes ~8,000
    # in the 0.2 s before a disconnect).
    assert metrics["vllm:generation_tokens_total"] - generated_before < 32 * 1000
    log = server.log.read_text()
    assert log.count("finish=abort") == aborts_before + 1


def test_disconnect_mid_stream_aborts_and_frees_kv(server: Server) -> None:
    generated = server.wait_idle()["vllm:generation_tokens_total"]
    aborts = server.log.read_text().count("finish=abort")
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}) as response:
        assert response.status_code == 200
        data = 0
        for line in response.iter_lines():
            data += line.startswith("data: {")
            if data == 2:
                break  # leaving the blocks closes the connection mid-stream
    _aborted(server, generated, aborts)


def test_disconnect_while_waiting_for_a_full_response_aborts(server: Server) -> None:
    generated = server.wait_idle()["vllm:generation_tokens_total"]
    aborts = server.log.read_text().count("finish=abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=0.2)
    _aborted(server, generated, aborts)


# ---- bad input -----------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]
BAD_REQUESTS = [  # (name, method, path, JSON body or raw bytes, status, param)
    ("prompt too long", "POST", COMPLETIONS, {"prompt": [5] * 1100}, 400, "prompt"),
    ("chat too long", "POST", CHAT, {"messages": [{"role": "user", "content": "Paris " * 1100}]},
     400, "messages"),
    ("bad temperature", "POST", COMPLETIONS, {"prompt": "hi", "temperature": -1}, 400,
     "temperature"),
    ("temperature not a number", "POST", COMPLETIONS, {"prompt": "hi", "temperature": "hot"},
     400, "temperature"),
    ("NaN", "POST", COMPLETIONS, b'{"prompt": "hi", "top_p": NaN}', 400, "top_p"),
    ("bad top_p", "POST", CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ("unknown model", "POST", CHAT, {"model": "gpt-4o", "messages": HELLO}, 400, "model"),
    ("malformed JSON", "POST", COMPLETIONS, b'{"prompt": "hi",', 400, None),
    ("body not an object", "POST", COMPLETIONS, b"[1, 2]", 400, None),
    ("messages not a list", "POST", CHAT, {"messages": "Hello"}, 400, "messages"),
    ("no messages", "POST", CHAT, {"messages": []}, 400, "messages"),
    ("no prompt", "POST", COMPLETIONS, {"max_tokens": 5}, 400, "prompt"),
    ("empty prompt", "POST", COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    ("token id past the vocabulary", "POST", COMPLETIONS, {"prompt": [1, 99999]}, 400,
     "prompt"),
    ("n is zero", "POST", COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n"),
    ("too many top_logprobs", "POST", CHAT,
     {"messages": HELLO, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("bad logit_bias", "POST", COMPLETIONS, {"prompt": "hi", "logit_bias": {"x": 1}}, 400,
     "logit_bias"),
    ("logit_bias past the vocabulary", "POST", CHAT,
     {"messages": HELLO, "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    ("stop token past the vocabulary", "POST", COMPLETIONS,
     {"prompt": "hi", "stop_token_ids": [10**6], "min_tokens": 2}, 400, "stop_token_ids"),
    ("negative seed", "POST", COMPLETIONS, {"prompt": "hi", "seed": -1}, 400, "seed"),
    # JSON's "\ud800" escape gives a lone surrogate: not Unicode text, no tokenizer reads it.
    ("lone surrogate in a prompt", "POST", COMPLETIONS, b'{"prompt": "ab\\udfffc"}', 400,
     "prompt"),
    ("lone surrogate in a message", "POST", CHAT,
     b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages"),
    ("body not UTF-8", "POST", COMPLETIONS, b'{"prompt": "\xff\xfe"}', 400, None),
    ("unknown role", "POST", CHAT, {"messages": [{"role": "alien", "content": "hi"}]}, 400,
     "messages"),
    ("max_tokens beyond the context", "POST", COMPLETIONS, {"prompt": "hi", "max_tokens": 10**9},
     400, "max_tokens"),
    ("max_completion_tokens beyond the context", "POST", CHAT,
     {"messages": HELLO, "max_completion_tokens": 1020}, 400, "max_tokens"),
    ("unknown route", "POST", "/v1/embeddings", {"input": "hi"}, 404, None),
    ("wrong method", "GET", COMPLETIONS, None, 405, None),
]


@pytest.mark.parametrize("name,method,path,body,status,param", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(
        server: Server, name: str, method: str, path: str, body: Any, status: int,
        param: str | None) -> None:
    raw = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    response = httpx.request(method, server.url + path, content=raw,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    ok = httpx.post(f"{server.url}{COMPLETIONS}", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_max_tokens_beyond_the_context_gets_vllms_400(limited: Server) -> None:
    ids = [5, 6, 7, 8, 9]
    response = httpx.post(f"{limited.url}{COMPLETIONS}", headers=AUTH,
                          json={"prompt": ids, "max_tokens": 124})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "'max_tokens' or 'max_completion_tokens' is too large: 124. This model's maximum "
        "context length is 128 tokens and your request has 5 input tokens (124 > 128 - 5)")
    # What fits is run (the prompt and max_tokens together fill the context exactly).
    ok = httpx.post(f"{limited.url}{COMPLETIONS}", headers=AUTH,
                    json={"prompt": ids, "max_tokens": 123, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 123


def test_api_key_is_required_on_v1(limited: Server) -> None:
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}]:
        response = httpx.post(f"{limited.url}{COMPLETIONS}", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    # Checked before the body is even parsed.
    assert httpx.post(f"{limited.url}{COMPLETIONS}", content=b"{").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(limited, "wrong").models.list()
    assert client(limited, API_KEY).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert httpx.get(f"{limited.url}/health").status_code == 200
    assert httpx.get(f"{limited.url}/metrics").status_code == 200


def test_request_body_size_is_bounded(limited: Server) -> None:
    body = {"prompt": "hi " * 30000, "max_tokens": 2}
    response = httpx.post(f"{limited.url}{COMPLETIONS}", json=body, headers=AUTH)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_streamed_body_without_content_length_is_bounded_too(limited: Server) -> None:
    """A chunked body declares no size: it is counted as it arrives."""
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(100):  # 100 KiB in all, past --max-request-bytes 65536
            yield b"a" * 1024
        yield b'"}'

    response = httpx.post(f"{limited.url}{COMPLETIONS}", content=chunks(),
                          headers={**AUTH, "Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_full_queue_gets_503_with_retry_after(limited: Server) -> None:
    body = {"prompt": "hi", "max_tokens": LIMITED_CONTEXT - 8, "ignore_eos": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=limited.url, headers=AUTH, timeout=60) as http:
            return await asyncio.gather(*(http.post(COMPLETIONS, json=body) for _ in range(16)))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    # At most one runs and four wait (--max-num-seqs 1 --max-waiting 4): the rest of the burst
    # is turned away, and the admitted ones all finish.
    assert set(statuses) == {200, 503} and statuses.count(200) >= 4, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    limited.wait_idle()
    assert httpx.post(f"{limited.url}{COMPLETIONS}", json=body, headers=AUTH).status_code == 200


# ---- fuzzing -------------------------------------------------------------------------------

FUZZ_EXAMPLES = 60  # per operation and mode


def fuzz(server: Server, check: Callable[[Any], None]) -> None:
    """`check` each of FUZZ_EXAMPLES schemathesis cases, schema-valid and schema-violating,
    for every operation the server's OpenAPI schema lists."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {COMPLETIONS, CHAT, "/v1/models", "/metrics"}
    for operation in operations:
        # Schema-violating input needs something to violate: a body.
        with_body = operation.method.upper() == "POST"
        for mode in [GenerationMode.POSITIVE, GenerationMode.NEGATIVE][:1 + with_body]:

            @given(case=operation.as_strategy(mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                      database=None, suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                check(case)

            run()


def test_fuzzed_requests_never_get_a_5xx(limited: Server) -> None:
    """With the API key. The limited server keeps each generation short: its context is 128
    tokens."""
    fuzz(limited, lambda case: case.call_and_validate(
        base_url=limited.url, headers=AUTH, checks=[not_a_server_error], timeout=60))


def test_fuzzed_requests_without_the_api_key_get_401_on_v1(limited: Server) -> None:
    def check(case: Any) -> None:
        response = case.call(base_url=limited.url, timeout=60)
        assert response.status_code == 401 if case.path.startswith("/v1") \
            else response.status_code < 500, (case.path, response.status_code)

    fuzz(limited, check)


# ---- a failing engine step ------------------------------------------------------------------

def test_a_failed_step_fails_its_requests_and_the_engine_carries_on(
        converted: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(converted[MODEL]), intra_op_num_threads=1))
    step, calls = engine.step, 0

    def flaky_step() -> list[RequestOutput]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("injected failure")
        return step()

    engine.step = flaky_step  # type: ignore[method-assign]
    async_engine = AsyncEngine(engine, max_waiting=8, metrics=ServerMetrics(MODEL))
    async_engine.start()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def main() -> list[RequestOutput]:
        failed = await async_engine.submit("a", ["Hello"], params, "prompt")
        with pytest.raises(APIError) as error:
            await failed.final()
        assert error.value.status == 500
        failed.close()
        ok = await async_engine.submit("b", ["Hello"], params, "prompt")
        outputs = await ok.final()
        ok.close()
        return outputs

    outputs = asyncio.run(main())
    async_engine.stop()
    assert len(outputs[0].outputs[0].token_ids) == 20
    assert not engine.has_unfinished_requests() and engine.block_manager.num_seq_blocks == 0


# ---- a dead engine thread, a failing stream --------------------------------------------------

def test_a_dead_engine_thread_fails_every_request_at_once_and_refuses_new_ones(
        converted: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(converted[MODEL]), intra_op_num_threads=1))
    deaths = []
    async_engine = AsyncEngine(engine, max_waiting=8, metrics=ServerMetrics(MODEL),
                               on_death=lambda: deaths.append(True))
    publish = async_engine._publish_stats

    def publish_then_break() -> None:  # a bug outside any step: the thread itself dies
        publish()
        if len(engine.requests) == 6:  # once all three requests (two prompts each) run
            raise RuntimeError("injected engine-thread bug")

    async_engine._publish_stats = publish_then_break  # type: ignore[method-assign]
    async_engine.start()
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> None:
        streams = [await async_engine.submit(f"r{i}", ["Hello"] * 2, params, "prompt")
                   for i in range(3)]
        for stream in streams:
            with pytest.raises(APIError) as error:
                await asyncio.wait_for(stream.final(), 30)
            assert error.value.status == 500 and error.value.code == "engine_dead"
            stream.close()
        with pytest.raises(APIError) as error:
            await async_engine.submit("late", ["Hello"], params, "prompt")
        assert error.value.status == 503

    asyncio.run(main())
    async_engine.stop()  # joins the thread: it calls on_death after failing the requests
    assert deaths == [True] and not async_engine.is_alive()


KILLER = """import sys
from nanovllm_onnx import cli
from nanovllm_onnx.server.api_server import serve
from nanovllm_onnx.server.async_engine import AsyncEngine

publish = AsyncEngine._publish_stats


def publish_then_break(self):
    publish(self)
    if len(self.engine.requests) == 2:  # both requests run: some steps on, die
        self.doomed = getattr(self, "doomed", 0) + 1
        # 200 of the 500 tokens: enough steps that the stream has sent its first chunk even
        # when the event loop waits for the GIL (50 steps of the tiny model were not, once).
        if self.doomed > 200:
            raise RuntimeError("injected engine-thread bug")


AsyncEngine._publish_stats = publish_then_break
cli.main(sys.argv[1:])
"""


def test_engine_death_ends_streams_with_an_error_and_exits_the_server_non_zero(
        converted: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "killer.py").write_text(KILLER)
    s = start_server(converted[MODEL], tmp_path / "server.log",
                     launcher=[str(tmp_path / "killer.py")])
    try:
        body = {"prompt": "Hello", "max_tokens": 500, "ignore_eos": True}

        async def main() -> tuple[list[str], httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as http:
                async def stream() -> list[str]:
                    async with http.stream("POST", COMPLETIONS,
                                           json={**body, "stream": True}) as response:
                        assert response.status_code == 200
                        return [line async for line in response.aiter_lines() if line]

                return await asyncio.gather(stream(), http.post(COMPLETIONS, json=body))

        events, full = asyncio.run(main())
        assert events[-1] == DONE.strip()
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "engine_dead" and error["type"] == "server_error"
        assert "choices" in events[0]  # it had started
        assert full.status_code == 500 and full.json()["error"]["code"] == "engine_dead"
        assert s.process.wait(30) != 0
        assert "the engine thread died" in s.log.read_text()
    finally:
        s.stop()


class _FailingStream:
    """A RequestStream whose second update meets a bug."""

    engine_ids = ["x-0"]
    prompt_tokens = 1
    outputs: list[RequestOutput | None] = []

    async def updates(self) -> AsyncIterator[list[RequestOutput | None]]:
        yield [RequestOutput("x", None, [1], [CompletionOutput(0, "Hi", [7])])]
        raise RuntimeError("injected bug")


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_a_bug_mid_stream_ends_it_with_an_error_event_and_done(chat: bool) -> None:
    async def main() -> list[str]:
        meta = ResponseMeta("x", 0, MODEL, chat)
        return [event async for event in event_stream(
            meta, _FailingStream(), SamplingParams(), include_usage=True)]  # type: ignore[arg-type]

    events = asyncio.run(main())
    assert events[-1] == DONE
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "internal_error"
    assert "Hi" in events[-3]  # what came before the bug was sent
