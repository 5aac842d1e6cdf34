"""Prefix-cache affinity for Ray Serve: a request goes to the replica that already holds the
longest prefix of its prompt in its KV cache, unless that replica is overloaded.

The router remembers, per replica, the chained hashes of the prompt chunks it sent there (as the
engine's block manager hashes its blocks: a chunk's hash covers everything before it), so a
shared system prompt of any length maps to one replica. It runs in every process that holds a
handle to the engine replicas (the OpenAI ingress), each with its own memory.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Iterator

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from nanovllm_onnx.server.async_engine import ChatPrompt

TOKENS_PER_CHUNK = 16  # a KV block of the default block size
CHARS_PER_CHUNK = 64  # about 16 tokens of English text


def prefix_chunks(prompt: object) -> Iterator[bytes]:
    """Chained hashes of the prompt's chunks, whole chunks only (a partial one cannot hit)."""
    if isinstance(prompt, ChatPrompt):
        prompt = "".join(f"<{m.get('role')}>{m.get('content')}" for m in prompt.messages)
    if isinstance(prompt, str):
        data, size = prompt.encode(), CHARS_PER_CHUNK
    else:  # token ids
        data, size = b"".join(int(t).to_bytes(4, "little") for t in prompt), 4 * TOKENS_PER_CHUNK
    digest = hashlib.blake2b(digest_size=16)
    for start in range(0, len(data) - size + 1, size):
        digest.update(data[start:start + size])
        yield digest.digest()


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router (`request_router_config`): the replica with the longest cached
    prefix of the prompt first, then the rest by queue length; a preferred replica whose queue
    is `max_imbalance` longer than the shortest is passed over, and so is everything when the
    prompt has no known prefix."""

    def initialize_state(self, max_imbalance: int = 4, max_chunks: int = 200_000) -> None:
        self.max_imbalance = max_imbalance
        self.max_chunks = max_chunks
        self._owners: OrderedDict[bytes, ReplicaID] = OrderedDict()  # chunk -> replica, LRU

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        queue = {r.replica_id: self._queue_len(r) for r in candidate_replicas}
        by_load = sorted(candidate_replicas, key=lambda r: (queue[r.replica_id], random.random()))
        chunks = self._chunks(pending_request)
        owner = self._longest_prefix_owner(chunks, set(queue))
        if owner is None or queue[owner] - queue[by_load[0].replica_id] > self.max_imbalance:
            owner = by_load[0].replica_id
        preferred = [r for r in by_load if r.replica_id == owner]
        return [preferred, [r for r in by_load if r.replica_id != owner]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: object) -> None:
        """The replica that took the request holds its prompt's prefix now (it may not be the
        preferred one: that one may have refused it, full)."""
        for chunk in self._chunks(pending_request):
            self._owners[chunk] = replica_id
            self._owners.move_to_end(chunk)
        while len(self._owners) > self.max_chunks:
            self._owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for chunk in [c for c, owner in self._owners.items() if owner == replica_id]:
            del self._owners[chunk]  # its cache died with it

    def _queue_len(self, replica: RunningReplica) -> int:
        """Requests on the replica as Ray counts them (it updates its cache on each send and
        probe), else what the replica last reported (record_routing_stats)."""
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return cached
        return int((replica.routing_stats or {}).get("queue_len", 0))

    def _longest_prefix_owner(self, chunks: list[bytes], live: set[ReplicaID]
                              ) -> ReplicaID | None:
        owner = None
        for chunk in chunks:
            holder = self._owners.get(chunk)
            if holder is None or holder not in live:
                break
            owner = holder
        return owner

    @staticmethod
    def _chunks(pending_request: PendingRequest | None) -> list[bytes]:
        """The first prompt's chunks, from the engine request (`EngineRequest.prompts`)."""
        if pending_request is None or not pending_request.args:
            return []
        prompts = getattr(pending_request.args[0], "prompts", None)
        return list(prefix_chunks(prompts[0])) if prompts else []
