"""Ray Serve: the OpenAI server over N engine replicas, on one machine or a cluster.

Two deployments. `EngineReplica` (N replicas, one LLMEngine each, in the server's own
AsyncEngine) streams a request's outputs; `OpenAIIngress` is the same FastAPI app as
`nano-vllm-onnx serve` (server.api_server.build_app), whose engine is a `RemoteEngine`: it sends
each request through a handle to the replicas, where `PrefixAffinityRouter` picks the replica.
Replicas report their health (a dead engine thread fails Ray's health check, which restarts the
replica) and their queue (record_routing_stats), and Ray's autoscaling sees their ongoing
requests.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from nanovllm_onnx.config import EngineConfig
from nanovllm_onnx.default_model import DEFAULT_MODEL_NAME
from nanovllm_onnx.engine.llm_engine import LLMEngine
from nanovllm_onnx.engine.speculative import SpecDecodeStats
from nanovllm_onnx.outputs import RequestOutput
from nanovllm_onnx.sampling_params import SamplingParams, StructuredOutputsParams
from nanovllm_onnx.server import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING
from nanovllm_onnx.server.api_server import build_app as build_fastapi_app
from nanovllm_onnx.server.async_engine import AsyncEngine, ChatPrompt, RequestStream
from nanovllm_onnx.server.metrics import ServerMetrics
from nanovllm_onnx.server.protocol import APIError, Prompt

logger = logging.getLogger(__name__)


@dataclass
class EngineRequest:
    """One OpenAI request's prompts, as the replicas (and the router) get them."""

    request_id: str
    prompts: Sequence[Prompt | ChatPrompt]
    params: SamplingParams
    prompt_param: str


@dataclass
class ReplicaError:
    """An APIError the replica answered (refused prompt, overload), to raise in the ingress."""

    status: int
    message: str
    fields: dict[str, Any]


# The engine state a replica reports (its metrics' samples, by the names used here).
ENGINE_STATE = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
                "kv_cache_usage": "vllm:kv_cache_usage_perc",
                "prefix_cache_blocks": "nanovllm_prefix_cache_blocks",
                "prefix_cache_queries": "vllm:prefix_cache_queries_total",
                "prefix_cache_hits": "vllm:prefix_cache_hits_total",
                "prompt_tokens": "vllm:prompt_tokens_total",
                "generation_tokens": "vllm:generation_tokens_total",
                "preemptions": "vllm:num_preemptions_total", "steps": "nanovllm_engine_steps_total",
                "spec_decode_num_drafts": "vllm:spec_decode_num_drafts_total",
                "spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
                "spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total"}
SPEC_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                 "spec_decode_num_accepted_tokens")  # SpecDecodeStats' fields, in order
COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens",
            "preemptions", "steps", *SPEC_COUNTERS)


@dataclass
class ReplicaReport:
    """A replica's engine state after a request, the last item of every stream."""

    replica: str
    state: dict[str, float]  # ENGINE_STATE's keys


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  health_check_period_s=2, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
class EngineReplica:
    def __init__(self, engine_args: dict[str, Any], max_waiting: int, model_name: str) -> None:
        self.engine = AsyncEngine(LLMEngine(EngineConfig(**engine_args)), max_waiting,
                                  ServerMetrics(model_name))
        self.engine.start()
        self.name = serve.get_replica_context().replica_id.unique_id

    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def chat_template(self) -> str | None:
        return self.engine.chat_template

    # These answer with what the engine's method returns, or the ValueError saying why it
    # cannot (RemoteEngine._ask raises it at the ingress: the request's 400).
    async def compile_constraint(self, constraint: StructuredOutputsParams) -> None | ValueError:
        """None once compiled (then cached here)."""
        return await _answer(self.engine.compile_constraint(constraint))

    async def tokenize(self, prompt: str | ChatPrompt, add_special_tokens: bool | None
                       ) -> tuple[list[int], list[str | None]] | ValueError:
        return await _answer(self.engine.tokenize(prompt, add_special_tokens))

    async def detokenize(self, ids: list[int]) -> str | ValueError:
        return await _answer(self.engine.detokenize(ids))

    async def generate(self, request: EngineRequest) -> AsyncIterator[Any]:
        """The prompt token count, then the latest outputs after each step, then a
        ReplicaReport; or a ReplicaError. Cancelled (the client left, or the ingress died),
        the stream's close() aborts the engine requests and frees their KV blocks."""
        try:
            stream = await self.engine.submit(request.request_id, request.prompts,
                                              request.params, request.prompt_param)
        except APIError as e:
            yield _replica_error(e)
            return
        try:
            yield stream.prompt_tokens
            async for outputs in stream.updates():
                yield list(outputs)
        except APIError as e:
            yield _replica_error(e)
        finally:
            stream.close()
        yield self.stats()

    def stats(self) -> ReplicaReport:
        names = {name: key for key, name in ENGINE_STATE.items()}
        state = {names[sample.name]: sample.value
                 for metric in self.engine.metrics.registry.collect()
                 for sample in metric.samples if sample.name in names}
        return ReplicaReport(self.name, state)

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("the engine thread died")

    def record_routing_stats(self) -> dict[str, Any]:
        state = self.stats().state
        return {"queue_len": int(state["running"] + state["waiting"]),
                "kv_cache_usage": state["kv_cache_usage"]}

    def __del__(self) -> None:
        self.engine.stop()


def _replica_error(e: APIError) -> ReplicaError:
    return ReplicaError(e.status, e.message, {"type": e.type, "param": e.param, "code": e.code,
                                              "headers": e.headers})


async def _answer(call: Awaitable[Any]) -> Any:
    """What `call` returns, or the ValueError it raises (returned: it crosses to the ingress)."""
    try:
        return await call
    except ValueError as e:
        return e


def _replica_failed() -> APIError:
    return APIError(503, "the replica running this request failed; retry", type="server_error",
                    code="replica_failed", headers={"Retry-After": "1"})


class RemoteEngine:
    """What the HTTP routes need of AsyncEngine (submit, abort, compile_constraint, tokenize,
    detokenize, metrics, max_model_len, chat_template), over the handle to the engine
    replicas. A replica that dies mid-request ends its requests with a 503 (an error event when
    streaming), never a hang."""

    def __init__(self, replicas: DeploymentHandle, max_model_len: int,
                 chat_template: str | None, model_name: str) -> None:
        self.replicas = replicas
        self.streams = replicas.options(stream=True)
        self.max_model_len = max_model_len
        self.chat_template = chat_template
        self.metrics = ServerMetrics(model_name)
        self.reports: dict[str, dict[str, float]] = {}  # each replica's latest state
        self._responses: dict[str, DeploymentResponseGenerator] = {}
        self._pumps: set[asyncio.Task] = set()

    def start(self) -> None:
        pass  # the replicas run their engines

    def stop(self) -> None:
        pass

    def is_alive(self) -> bool:
        return True  # Ray restarts dead replicas; a request in the meantime gets a 503

    def _record(self, report: ReplicaReport) -> None:
        """The replicas' engine state into this server's metrics, as they last reported it:
        queues and cached blocks added up, KV usage their mean, counters (tokens, prefix-cache
        lookups, preemptions, steps, speculative drafts) by what each added, and the
        acceptance gauges from the replicas' counters."""
        before = self.reports.get(report.replica, {})
        self.reports[report.replica] = report.state
        m = self.metrics
        for key in COUNTERS:
            added = report.state[key] - before.get(key, 0.0)
            getattr(m, key).inc(added if added >= 0 else report.state[key])  # a new replica
        states = list(self.reports.values())
        m.running.set(sum(s["running"] for s in states))
        m.waiting.set(sum(s["waiting"] for s in states))
        m.kv_cache_usage.set(sum(s["kv_cache_usage"] for s in states) / len(states))
        m.prefix_cache_blocks.set(sum(s["prefix_cache_blocks"] for s in states))
        spec = SpecDecodeStats(*(int(sum(s[key] for s in states)) for key in SPEC_COUNTERS))
        m.spec_decode_acceptance_rate.set(spec.acceptance_rate)
        m.spec_decode_mean_accepted_length.set(spec.mean_accepted_length)

    async def submit(self, request_id: str, prompts: Sequence[Prompt | ChatPrompt],
                     params: SamplingParams, prompt_param: str) -> RequestStream:
        stream = RequestStream(self, request_id, len(prompts))
        responses = self.streams.generate.remote(
            EngineRequest(request_id, prompts, params, prompt_param))
        self._responses[request_id] = responses
        pump = asyncio.create_task(self._pump(stream, responses))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        await stream.wait_admitted()
        return stream

    async def compile_constraint(self, constraint: StructuredOutputsParams) -> None:
        """Compiled (and so checked) by a replica: the ingress may run where the model's
        files are not. The replica keeps it cached for its requests."""
        await self._ask(self.replicas.compile_constraint, constraint)

    async def tokenize(self, prompt: str | ChatPrompt, add_special_tokens: bool | None
                       ) -> tuple[list[int], list[str | None]]:
        """By a replica, as compile_constraint: the ingress may run where the model's files are
        not."""
        return await self._ask(self.replicas.tokenize, prompt, add_special_tokens)

    async def detokenize(self, ids: list[int]) -> str:
        return await self._ask(self.replicas.detokenize, ids)

    async def _ask(self, method: Any, *args: Any) -> Any:
        """A replica's answer to a call of `method`: the ValueError it answers with raised
        here; a 503 where the replica failed."""
        try:
            answer = await method.remote(*args)
        except Exception as e:
            logger.warning("asking a replica: it failed: %s", e)
            raise _replica_failed() from e
        if isinstance(answer, ValueError):
            raise answer
        return answer

    def abort(self, engine_ids: list[str]) -> None:
        request_id = engine_ids[0].rpartition("-")[0]  # RequestStream's "<request id>-<i>"
        if (responses := self._responses.pop(request_id, None)) is not None:
            responses.cancel()  # the replica's generator is cancelled: it aborts and frees

    async def _pump(self, stream: RequestStream, responses: DeploymentResponseGenerator
                    ) -> None:
        try:
            async for item in responses:
                if isinstance(item, ReplicaReport):
                    self._record(item)
                elif isinstance(item, ReplicaError):
                    stream.deliver(APIError(item.status, item.message, **item.fields))
                elif isinstance(item, int):
                    stream.deliver(item)
                else:
                    for index, output in enumerate(item):
                        if isinstance(output, RequestOutput):
                            stream.deliver((index, output))
        except Exception as e:  # the replica died, or the request was cancelled
            logger.warning("request %s: its replica failed: %s", stream.request_id, e)
            stream.deliver(_replica_failed())
        finally:
            self._responses.pop(stream.request_id, None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class OpenAIIngress:
    async def __init__(self, replicas: DeploymentHandle, served_model_name: str,
                       api_key: str | None, max_request_bytes: int,
                       tool_call_parser: str | None) -> None:
        max_model_len = await replicas.max_model_len.remote()
        chat_template = await replicas.chat_template.remote()
        self.engine = RemoteEngine(replicas, max_model_len, chat_template, served_model_name)
        self.app_args = (served_model_name, api_key, max_request_bytes, tool_call_parser)

    def __serve_build_asgi_app__(self) -> Any:
        return build_fastapi_app(self.engine, *self.app_args)


def build_app(model: str | None = None, engine_args: dict[str, Any] | None = None, *,
              num_replicas: int | None = None,
              autoscaling_config: dict[str, Any] | None = None,
              served_model_name: str | None = None, api_key: str | None = None,
              max_waiting: int = DEFAULT_MAX_WAITING,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              prefix_affinity: bool = True, max_imbalance: int = 4,
              tool_call_parser: str | None = None) -> serve.Application:
    """The OpenAI app over engine replicas, for `serve.run(app)`. `engine_args`: EngineConfig's
    fields (checked here); each replica reserves intra_op_num_threads CPUs of the cluster.
    `num_replicas` or `autoscaling_config` (Ray Serve's), not both; default one replica.
    `prefix_affinity`: route by prompt prefix (PrefixAffinityRouter), else Ray Serve's default
    (power of two choices by queue length). `max_imbalance`: how many more queued requests than
    the least loaded replica the replica holding a prompt's prefix may have and still get it.
    `tool_call_parser`: as `serve --tool-call-parser` (default: from the chat template)."""
    if num_replicas is not None and autoscaling_config is not None:
        raise ValueError("give num_replicas or autoscaling_config, not both")
    if num_replicas is not None and num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    engine_args = {**(engine_args or {}), "model": model}
    cfg = EngineConfig(**engine_args)  # a bad argument fails here, not in every replica
    name = served_model_name or (model.rstrip("/").rsplit("/", 1)[-1] if model
                                 else DEFAULT_MODEL_NAME)
    router = {"request_router_class": "nanovllm_onnx.ray.router:PrefixAffinityRouter",
              "request_router_kwargs": {"max_imbalance": max_imbalance}} \
        if prefix_affinity else {}
    replicas = EngineReplica.options(
        num_replicas=num_replicas or (None if autoscaling_config else 1),
        autoscaling_config=autoscaling_config,
        ray_actor_options={"num_cpus": max(cfg.intra_op_num_threads, 1)},
        request_router_config={**router, "request_routing_stats_period_s": 1},
    ).bind(engine_args, max_waiting, name)
    return OpenAIIngress.bind(replicas, name, api_key, max_request_bytes, tool_call_parser)


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run nanovllm_onnx.ray:app_builder model=... num_replicas=2
    intra_op_num_threads=1 ...`: build_app's keyword arguments and EngineConfig's fields as
    key=value (values read as JSON where they parse: numbers, true/false, null)."""
    values = {key: _json_or_text(value) for key, value in args.items()}
    own = {k: values.pop(k) for k in inspect.signature(build_app).parameters
           if k in values and k != "engine_args"}
    return build_app(own.pop("model", None), values, **own)


def _json_or_text(value: Any) -> Any:
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return value
