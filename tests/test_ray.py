"""The engine on a local Ray cluster (2 CPUs): Ray Serve replicas behind the OpenAI routes,
prefix-affinity routing, a replica killed under load, and Ray Data batch inference."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
if os.environ.get("CI") == "true":
    assert ray  # CI installs the test extra, which includes ray: never skip there
from ray import serve  # noqa: E402

from nanovllm_onnx import LLM, SamplingParams  # noqa: E402
from nanovllm_onnx.default_model import default_model_path  # noqa: E402
from nanovllm_onnx.ray import build_app, generate_dataset  # noqa: E402
from nanovllm_onnx.ray.deployment import EngineRequest, ReplicaReport  # noqa: E402

ENGINE_ARGS = {"intra_op_num_threads": 1, "kv_cache_memory_gib": 0.1, "max_model_len": 1024,
               "max_num_seqs": 8}
# The replicas speculate (ngram): greedy answers must still equal the plain engine's.
REPLICA_ARGS = {**ENGINE_ARGS, "speculative_config": {"method": "ngram",
                                                       "num_speculative_tokens": 4}}
APP = "llm"


@pytest.fixture(scope="module")
def reference() -> LLM:
    """The engine in this process (converting the model once, not in both replicas at once)."""
    try:
        default_model_path()
    except RuntimeError as e:
        pytest.skip(f"default model unavailable: {e}")
    return LLM(**ENGINE_ARGS)


@pytest.fixture(scope="module")
def cluster(reference: LLM) -> Iterator[str]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False,
             log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(None, REPLICA_ARGS, num_replicas=2), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    serve.shutdown()
    ray.shutdown()


def client(base_url: str):  # noqa: ANN201
    import openai

    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_replicas_answer_openai_clients_streaming_and_not(cluster: str, reference: LLM) -> None:
    api = client(cluster)
    texts = [api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                         temperature=0, max_tokens=24).choices[0].message.content
             for _ in range(3)]
    assert "Paris" in texts[0] and texts == [texts[0]] * 3
    chunks = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                         temperature=0, max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == texts[0]
    completion = api.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3,",
                                        max_tokens=6, temperature=0)
    expected = reference.generate("1, 2, 3,", SamplingParams(temperature=0, max_tokens=6),
                                  use_tqdm=False)[0].outputs[0].text
    assert completion.choices[0].text == expected
    # The ingress's /metrics: its own request metrics, and the engine state the replicas
    # reported (3 equal chats on 2 replicas: one replica saw the prompt twice, a prefix hit).
    metrics = ingress_metrics(cluster)
    assert sum(v for k, v in metrics.items() if k.startswith("vllm:request_success_total")) == 5
    assert metrics["vllm:generation_tokens_total"] >= 5
    assert metrics["nanovllm_engine_steps_total"] >= 5
    assert metrics["vllm:prefix_cache_hits_total"] >= 16
    assert metrics["vllm:num_requests_running"] == metrics["vllm:num_requests_waiting"] == 0
    drafted, accepted = (metrics[f"vllm:spec_decode_num_{k}_total"]
                         for k in ("draft_tokens", "accepted_tokens"))
    assert drafted > 0  # "1, 2, 3, 4, 5," proposes its own ", "
    assert metrics["nanovllm_spec_decode_acceptance_rate"] == pytest.approx(accepted / drafted)


def ingress_metrics(base_url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    return {s.name + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                              if k not in ("model_name", "engine")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_structured_outputs_and_tool_calls_through_the_ingress(cluster: str) -> None:
    """The ingress has no engine: a replica compiles the grammar (a bad one is a 400 naming
    the field), and tool calls parse with the replicas' chat template."""
    import json

    import openai

    api = client(cluster)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    reply = api.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0, max_tokens=40,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert list(json.loads(reply.choices[0].message.content)) == ["city"]
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=4,
                               extra_body={"structured_outputs": {"regex": "(unclosed"}})
    assert bad.value.body["param"] == "structured_outputs"
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    reply = api.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0, max_tokens=60,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert reply.choices[0].finish_reason == "tool_calls"
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert list(json.loads(call.function.arguments)) == ["city"]


def test_tokenize_and_detokenize_through_the_ingress(cluster: str, reference: LLM) -> None:
    """A replica tokenizes (the ingress has no tokenizer): the engine's own tokens."""
    import httpx

    root = cluster.removesuffix("/v1")
    got = httpx.post(f"{root}/tokenize", json={"messages": QUESTION}, timeout=60).json()
    ids = reference.llm_engine.tokenizer.chat_prompt_ids(QUESTION)
    assert got["tokens"] == ids and got["count"] == len(ids)
    text = httpx.post(f"{root}/detokenize", json={"tokens": ids}, timeout=60).json()["prompt"]
    assert text == reference.llm_engine.tokenizer.decode(ids, skip_special_tokens=False)
    bad = httpx.post(f"{root}/detokenize", json={"tokens": [10**9]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def replica_stats() -> dict[str, ReplicaReport]:
    """Each live replica's stats (calls go to the least loaded replica: ask until both)."""
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP)
    reports: dict[str, ReplicaReport] = {}
    for _ in range(40):
        report = handle.stats.remote().result()
        reports[report.replica] = report
        if len(reports) == 2:
            break
    return reports


def test_shared_prefix_requests_land_on_one_replica(cluster: str) -> None:
    handle = serve.get_deployment_handle("EngineReplica", app_name=APP).options(stream=True)
    system = "You are a terse assistant who answers in one word. " * 12  # ~150 tokens
    before = replica_stats()
    served = []
    for i in range(6):
        request = EngineRequest(f"prefix-{i}", [f"{system}Question {i}: name a color."],
                                SamplingParams(temperature=0, max_tokens=2), "prompt")
        items = list(handle.generate.remote(request))
        assert isinstance(items[-1], ReplicaReport)
        served.append(items[-1].replica)
    assert len(set(served)) == 1  # all on the replica that cached the prefix first
    after = replica_stats()
    hits = (after[served[0]].state["prefix_cache_hits"]
            - before[served[0]].state["prefix_cache_hits"])
    assert hits >= 5 * 8 * 16  # the 5 later requests each reused the prefix's 8+ blocks


def test_a_client_that_leaves_frees_its_kv_on_the_replica(cluster: str) -> None:
    """The ingress cancels the replica's stream; the replica aborts the request."""
    stream = client(cluster).completions.create(
        model="SmolLM2-135M-Instruct", prompt="Count to a thousand:", max_tokens=900,
        temperature=0, stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    assert any(r.state["running"] == 1 for r in replica_stats().values())
    stream.close()
    deadline = time.time() + 30
    while any(r.state["running"] or r.state["kv_cache_usage"]
              for r in replica_stats().values()):
        assert time.time() < deadline, "the request still runs after its client left"
        time.sleep(0.2)


def test_a_killed_replica_fails_its_requests_and_is_replaced(cluster: str) -> None:
    api = client(cluster)
    results: list[str] = []

    def ask(i: int) -> None:
        try:
            stream = api.completions.create(model="SmolLM2-135M-Instruct",
                                            prompt=f"Count from {i}:", max_tokens=120,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
            text = "".join(c.choices[0].text for c in stream if c.choices)
            results.append("done" if len(text) > 0 else "empty")
        except Exception as e:  # the error event or a broken stream
            results.append(f"error: {type(e).__name__}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)  # all four are generating by now
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "EngineReplica" in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(results) == 4 and any(r.startswith("error") for r in results)

    deadline = time.time() + 120  # Ray starts a new replica
    while time.time() < deadline:
        status = serve.status().applications[APP].deployments["EngineReplica"]
        if status.replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert status.replica_states.get("RUNNING", 0) == 2
    for report in replica_stats().values():  # the aborted requests' KV blocks are free
        assert report.state["running"] == 0 and report.state["kv_cache_usage"] == 0
    answer = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION,
                                         temperature=0, max_tokens=24)
    assert "Paris" in answer.choices[0].message.content


def test_ray_data_matches_llm_generate(cluster: str, reference: LLM) -> None:
    prompts = ["The capital of France is", "1, 2, 3,", "Water boils at", "Hello, my name is"]
    rows = [{"prompt": p, "sampling_params": {"temperature": 0, "max_tokens": 4 + i}}
            for i, p in enumerate(prompts)]
    serve.delete(APP)  # its replicas hold the cluster's CPUs
    out = generate_dataset(ray.data.from_items(rows), None, ENGINE_ARGS, concurrency=1,
                           batch_size=2).take_all()
    expected = reference.generate(
        prompts, [SamplingParams(temperature=0, max_tokens=4 + i) for i in range(4)],
        use_tqdm=False)
    by_prompt = {row["prompt"]: row for row in out}
    for prompt, ref in zip(prompts, expected):
        row = by_prompt[prompt]
        assert list(row["generated_token_ids"]) == ref.outputs[0].token_ids
        assert row["generated_text"] == ref.outputs[0].text
        assert row["finish_reason"] == "length" and row["error"] == ""
        assert row["num_generated_tokens"] == len(ref.outputs[0].token_ids)
        assert row["num_prompt_tokens"] == len(ref.prompt_token_ids)


def test_router_prefers_the_prefix_holder_unless_it_is_overloaded() -> None:
    """PrefixAffinityRouter alone, on three stand-in replicas: the replica that took a prefix
    gets the next prompt sharing it (even when another queue is shorter by max_imbalance);
    a prompt with no known prefix, or a holder more loaded than that, goes by queue length."""
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    from nanovllm_onnx.ray.router import PrefixAffinityRouter

    deployment = DeploymentID(name="EngineReplica", app_name="test")
    router = PrefixAffinityRouter(deployment, DeploymentHandleSource.UNKNOWN,
                                  use_replica_queue_len_cache=True)
    router.initialize_state(max_imbalance=2)
    replicas = [SimpleNamespace(replica_id=ReplicaID(f"r{i}", deployment), routing_stats={})
                for i in range(3)]
    ids = [r.replica_id for r in replicas]

    def route(prompt: list[int], queues: list[int]) -> ReplicaID:
        for replica_id, queue in zip(ids, queues):
            router.replica_queue_len_cache.update(replica_id, queue)
        request = SimpleNamespace(args=[EngineRequest("r", [prompt], SamplingParams(), "prompt")])
        ranks = asyncio.run(router.choose_replicas(replicas, request))
        chosen = ranks[0][0].replica_id
        router.on_request_routed(request, chosen, None)
        return chosen

    system = list(range(100, 164))  # 4 chunks of 16 tokens
    assert route(system + [1, 2], [3, 0, 5]) == ids[1]  # unknown: the shortest queue
    assert route(system + [7, 8, 9], [0, 2, 0]) == ids[1]  # holds the prefix, 2 more queued
    assert route(list(range(500, 540)), [0, 5, 1]) == ids[0]  # another prefix: by queue
    assert route(system + [3], [0, 3, 0]) in (ids[0], ids[2])  # holder overloaded: fallback
    holder = route(system + [4], [0, 0, 0])  # the prompt's prefix moved with it
    assert holder != ids[1]
    router.on_replica_actor_died(holder)
    assert route(system + [5], [4, 0, 4]) == ids[1]  # its replica died: by queue again
