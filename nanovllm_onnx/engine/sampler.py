"""Next-token sampling with vLLM V1's semantics, vectorized over the batch in numpy.

Order, as vLLM V1 applies it:
  1. logprobs, when asked, from the raw logits (log_softmax: vLLM's default "raw_logprobs");
  2. logit_bias; min_tokens (EOS and stop_token_ids at -inf until min_tokens outputs exist);
  3. repetition penalty (prompt and output tokens), then frequency and presence (output only);
  4. greedy rows (temperature < 1e-5) take the argmax here;
  5. the others: temperature, min_p, top_k, top_p, then one draw from what is left.

Top-k keeps every token whose logit is >= the k-th largest, so ties at the k-th value all stay
(vLLM compares against a threshold the same way). Top-p keeps the smallest best-first prefix
whose mass reaches top_p (always at least one token); inside a tie it keeps lower token ids first,
where vLLM's unstable sort leaves the choice unspecified.

Each row draws one uniform and inverts its CDF. A seeded row draws only from its sequence's
generator and the CDF is walked in an order fixed by that row alone, so the seed gives the same
tokens alone or in any batch.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from itertools import chain, count
from typing import TYPE_CHECKING

import numpy as np

from nanovllm_onnx.engine.sequence import Sequence
from nanovllm_onnx.kernels import kernel_target, target_library
from nanovllm_onnx.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nanovllm_onnx.engine.speculative import VerifyRow

# vLLM samples greedily below this temperature; dividing by it would overflow anyway.
_GREEDY_EPS = 1e-5
# Top-p looks for its nucleus among this many best tokens first (a partition and a short sort);
# a row whose nucleus goes past them finds its cut by bucketing its weights instead
# (_draw_from_nucleus), each by its float32 bits shifted right by _BUCKET_SHIFT.
_FIRST_CANDIDATES = 256
# From this vocabulary size on every top-p row is bucketed: the per-row loop (~0.1 ms a row)
# then costs less than the candidates' passes over the whole batch. 32 rows whose nucleus fits
# the candidates (normal logits of sd 6 or 10, Zipf-like of exponent 1.5), CPU time, shared
# machine: buckets 1.15-1.95x faster at 128,256 tokens, 0.90-1.36x at 49,152, 0.88-1.12x at
# 32,000.
_BUCKETS_FIRST_VOCAB = 1 << 16
_BUCKET_SHIFT = 16
_TOP_BUCKET = 0x3F800000 >> _BUCKET_SHIFT  # weight 1's; buckets are counted down from it
_LOW_32 = 0xFFFFFFFF
# The order key of a -inf logit with an id past any vocabulary: pads sort last and read as -inf.
_PAD_KEY = 0x7F800000_FFFFFFFF
# Random rows are independent, so a large batch is split into parts sampled on as many
# threads (numpy and ctypes release the GIL) while ONNX Runtime's threads wait for the next
# step. Two threads on a quiet 2-core machine, temperature 1.0 (the whole-vocabulary draw in
# ops.cc): 32 x 128,256 logits 1.30x faster (1.73 -> 1.32 ms), 16 x 128,256 1.10x, but 8 x
# 128,256 and 32 x 49,152 0.98-1.01x (the hand-off costs ~0.4 ms): parts of at least this many.
_MIN_PART = 1 << 20


class Sampler:
    """Picks each sequence's next token from its row of logits."""

    def __init__(self, eos_token_ids: list[int], num_threads: int = 1) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.num_threads = num_threads
        # Shared by the unseeded rows; a seeded row draws only from its own generator.
        self._rng = np.random.default_rng()
        self._workers: ThreadPoolExecutor | None = None  # started by the first large batch

    def __call__(
        self, logits: np.ndarray, seqs: list[Sequence | VerifyRow]
    ) -> tuple[np.ndarray, list[dict[int, float] | None]]:
        """logits: float32 [B, V], one row per seq, or per verified position of a sequence's
        draft tokens (a VerifyRow), (may be modified in place). Returns the sampled
        token ids (int64 [B]) and, per row, None or {token_id: logprob} for the top
        `params.logprobs` tokens plus the sampled one, from the raw logits."""
        logits = np.require(logits, dtype=np.float32, requirements=["C", "W"])
        params = [seq.params for seq in seqs]
        below_min = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if not below_min and all(map(_plain_greedy, params)):
            return logits.argmax(axis=1).astype(np.int64, copy=False), [None] * len(seqs)

        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = log_softmax(logits[lp_rows]) if lp_rows else None
        _apply_logit_bias(logits, params)
        if below_min:
            stop_ids = [self.eos_token_ids + params[i].stop_token_ids for i in below_min]
            _apply_min_tokens(logits, below_min, stop_ids)
        _apply_penalties(logits, seqs)

        temperature = np.array([p.temperature for p in params], dtype=np.float32)
        greedy = temperature < _GREEDY_EPS
        tokens = np.empty(len(seqs), dtype=np.int64)
        if greedy.any():
            tokens[greedy] = logits[greedy].argmax(axis=1)
        rand = np.flatnonzero(~greedy)
        if rand.size:
            rand_seqs = [seqs[i] for i in rand]
            u = self._uniforms(rand_seqs)
            tokens[rand] = self._sample_in_parts(
                logits if rand.size == len(seqs) else logits[rand], temperature[rand],
                [seq.params for seq in rand_seqs], u)

        logprobs: list[dict[int, float] | None] = [None] * len(seqs)
        for row, i in enumerate(lp_rows):
            logprobs[i] = logprob_dict(raw_logprobs[row], params[i].logprobs, int(tokens[i]))
        return tokens, logprobs

    def _sample_in_parts(self, x: np.ndarray, temperature: np.ndarray,
                         params: list[SamplingParams], u: np.ndarray) -> np.ndarray:
        """_sample over consecutive parts of the rows, which the calling thread and the
        workers take one at a time as each gets free: where no other core is free, the
        calling thread takes them all rather than wait for a worker. Each row's token depends
        on that row alone, so the parts give the tokens one call would."""
        num_parts = min(self.num_threads, len(x), x.size // _MIN_PART)
        if num_parts < 2:
            return _sample(x, temperature, params, u)
        if self._workers is None:
            self._workers = ThreadPoolExecutor(self.num_threads - 1, "sampler")
        bounds = np.linspace(0, len(x), num_parts + 1).astype(int).tolist()
        tokens = np.empty(len(x), dtype=np.int64)
        next_part = count()  # next() on it is atomic under the GIL
        done = [threading.Event() for _ in range(num_parts)]
        errors: list[BaseException] = []

        def take_parts() -> None:
            while (i := next(next_part)) < num_parts:
                lo, hi = bounds[i], bounds[i + 1]
                try:
                    tokens[lo:hi] = _sample(x[lo:hi], temperature[lo:hi], params[lo:hi],
                                            u[lo:hi])
                except BaseException as e:  # raised on the calling thread below
                    errors.append(e)
                finally:
                    done[i].set()

        for _ in range(num_parts - 1):
            self._workers.submit(take_parts)
        take_parts()
        for event in done:
            event.wait()
        if errors:
            raise errors[0]
        return tokens

    def _uniforms(self, seqs: list[Sequence | VerifyRow]) -> np.ndarray:
        """One uniform in [0, 1) per row."""
        u = np.empty(len(seqs))
        unseeded = [i for i, seq in enumerate(seqs) if seq.generator is None]
        if unseeded:
            u[unseeded] = self._rng.random(len(unseeded))
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                u[i] = seq.next_uniform()
        return u


def _sample(x: np.ndarray, temperature: np.ndarray, params: list[SamplingParams],
            u: np.ndarray) -> np.ndarray:
    """Temperature, min_p, top_k, top_p and one draw (uniform u) per row of logits x."""
    n, vocab = x.shape
    if (temperature != 1.0).any():  # x / 1 is x: skip a pass over the logits
        x /= temperature[:, None]

    min_p = np.array([p.min_p for p in params])
    rows = np.flatnonzero(min_p > 0)
    if rows.size:
        sub = x if rows.size == n else x[rows]
        # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p): no softmax needed.
        cut = sub.max(axis=1, keepdims=True) + np.log(min_p[rows, None]).astype(np.float32)
        np.putmask(sub, sub < cut, -np.inf)  # 2-3x faster than sub[sub < cut] = -np.inf
        if sub is not x:
            x[rows] = sub

    top_k = np.array([p.top_k for p in params], dtype=np.int64)
    top_k[top_k >= vocab] = 0  # keeping the whole vocabulary is no filter
    top_p = np.array([p.top_p for p in params])
    truncated = (top_k > 0) | (top_p < 1.0)

    tokens = np.empty(n, dtype=np.int64)
    full = np.flatnonzero(~truncated)
    if full.size:
        tokens[full] = _sample_full(x if full.size == n else x[full], u[full])
    part = np.flatnonzero(truncated)
    if part.size:
        tokens[part] = _sample_top_k_top_p(
            x if part.size == n else x[part], top_k[part], top_p[part], u[part]
        )
    return tokens


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing that changes the logits or asks for logprobs (min_tokens aside)."""
    return (
        p.temperature < _GREEDY_EPS
        and p.logprobs is None
        and not p.logit_bias
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
    )


def _flat_index(rows: list[int] | np.ndarray, ids: list[list[int]], vocab: int) -> np.ndarray:
    """row * vocab + token id for every id of every row, so one fancy index touches all rows."""
    arrays = [np.asarray(t, dtype=np.int64) for t in ids]
    flat_ids = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
    # An id past the vocabulary would silently land in the next row.
    if flat_ids.size and (flat_ids.min() < 0 or flat_ids.max() >= vocab):
        raise ValueError(f"token id outside the vocabulary of {vocab} tokens")
    lengths = [a.size for a in arrays]
    return np.repeat(np.asarray(rows, dtype=np.int64) * vocab, lengths) + flat_ids


def _apply_logit_bias(logits: np.ndarray, params: list[SamplingParams]) -> None:
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return
    biases = [params[i].logit_bias for i in rows]
    flat = _flat_index(rows, [list(b) for b in biases], logits.shape[1])
    values = np.fromiter(chain.from_iterable(b.values() for b in biases), dtype=np.float32)
    logits.reshape(-1)[flat] += values  # a dict's keys are distinct: no index repeats


def _apply_min_tokens(logits: np.ndarray, rows: list[int], stop_ids: list[list[int]]) -> None:
    """vLLM suppresses EOS and stop_token_ids even with ignore_eos: the outputs must reach
    min_tokens before anything that could end them."""
    logits.reshape(-1)[_flat_index(rows, stop_ids, logits.shape[1])] = -np.inf


def _apply_penalties(logits: np.ndarray, seqs: list[Sequence | VerifyRow]) -> None:
    """vLLM's definitions: repetition over prompt and output tokens (positive logits divided,
    the rest multiplied); frequency (per occurrence) and presence (once) over output tokens."""
    vocab = logits.shape[1]
    flat_logits = logits.reshape(-1)
    params = [seq.params for seq in seqs]

    repetition = np.array([p.repetition_penalty for p in params], dtype=np.float32)
    rows = np.flatnonzero(repetition != 1.0)
    if rows.size:
        seen = np.sort(_flat_index(rows, [seqs[i].token_ids for i in rows], vocab))
        # Deduplicated by hand: np.unique's hash path is several times slower at these sizes.
        seen = seen[np.r_[True, seen[1:] != seen[:-1]]]
        values = flat_logits[seen]
        r = repetition[seen // vocab]
        flat_logits[seen] = np.where(values > 0, values / r, values * r)

    frequency = np.array([p.frequency_penalty for p in params], dtype=np.float32)
    presence = np.array([p.presence_penalty for p in params], dtype=np.float32)
    rows = np.flatnonzero((frequency != 0.0) | (presence != 0.0))
    if rows.size:
        outputs = [seqs[i].output_token_ids for i in rows]
        ids, counts = np.unique(_flat_index(rows, outputs, vocab), return_counts=True)
        row = ids // vocab
        flat_logits[ids] -= frequency[row] * counts.astype(np.float32)
        flat_logits[ids] -= presence[row]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, in x's precision (float32 logits: as vLLM computes logprobs)."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logprob_dict(logprobs: np.ndarray, num: int, token: int) -> dict[int, float]:
    """The sampled token, then the `num` most likely ones (ties: lower ids), as vLLM gathers."""
    out = {token: float(logprobs[token])}
    num = min(num, logprobs.size)
    if num:
        kth = np.partition(logprobs, logprobs.size - num)[logprobs.size - num]
        best = np.flatnonzero(logprobs >= kth)
        best = best[np.lexsort((best, -logprobs[best]))][:num]
        out.update(zip(best.tolist(), logprobs[best].tolist(), strict=True))
    return out


def _inverse_cdf(
    cum: np.ndarray, u: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of running sums cum [n, m] (float64), the entry where the point u of the mass of
    the first `length` entries falls, and how far into that entry it fell, as a fraction (a fresh
    uniform for a second level)."""
    n, m = cum.shape
    rows = np.arange(n)
    below = np.hstack([np.zeros((n, 1)), cum[:, :-1]])  # the running sum before each entry
    target = u * cum[rows, length - 1]
    idx = np.count_nonzero(cum <= target[:, None], axis=1)
    # Rounding can put the target at the very end: take the last kept entry with weight then.
    weighted = (cum > below) & (np.arange(m) < length[:, None])
    idx = np.minimum(idx, m - 1 - np.argmax(weighted[:, ::-1], axis=1))
    return idx, (target - below[rows, idx]) / (cum[rows, idx] - below[rows, idx])


def _sample_full(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draw from softmax(x) per row, walking the vocabulary in token-id order: blocks of 256
    tokens first, then the drawn block's tokens (ops.cc's sampling, for this CPU's build: numpy
    took ~3x as long, in four passes over the logits)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = np.ascontiguousarray(u, dtype=np.float64)
    tokens = np.empty(len(x), dtype=np.int64)
    _draw_rows()(x.ctypes.data, len(x), x.shape[1], u.ctypes.data, tokens.ctypes.data)
    return tokens


@cache
def _draw_rows() -> Callable[..., None]:
    """ops.cc's NanovllmDrawRows in the build this process's sessions get (its sources' hash
    checked once)."""
    draw = target_library(kernel_target()).NanovllmDrawRows
    draw.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                     ctypes.c_void_p]
    draw.restype = None
    return draw


def _sample_top_k_top_p(x: np.ndarray, k: np.ndarray, p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Top-k (0 = off), then top-p (1 = off) renormalized over what top-k kept, then one draw."""
    n, vocab = x.shape
    # Without top-k, top-p's mass is relative to the whole vocabulary.
    z = np.zeros(n)
    no_k = np.flatnonzero(k == 0)
    w = np.empty((0, vocab), dtype=np.float32)
    if no_k.size:
        w = x[no_k]
        w -= w.max(axis=1, keepdims=True)
        z[no_k] = np.exp(w, out=w).sum(axis=1)
    # No weight exceeds the best one's 1: a nucleus holding p * z holds at least p * z tokens.
    wide = (k == 0) & ((p * z > _FIRST_CANDIDATES) | (vocab >= _BUCKETS_FIRST_VOCAB))
    tokens = np.empty(n, dtype=np.int64)
    rows = np.flatnonzero(~wide)
    if rows.size:
        width = max(int(k[rows].max()), _FIRST_CANDIDATES if (k[rows] == 0).any() else 0)
        xr = x if rows.size == n else x[rows]
        tok, done = _truncate_and_draw(xr, k[rows], p[rows], z[rows], u[rows], min(width, vocab))
        tokens[rows[done]] = tok[done]
        wide[rows[~done]] = True  # top-p rows whose nucleus goes past the candidates
    for row in np.flatnonzero(wide):
        token = _draw_from_nucleus(x[row], w[np.searchsorted(no_k, row)], z[row], p[row], u[row])
        if token is None:  # float64 sums could round: sort the whole row
            token = _truncate_and_draw(x[row:row + 1], k[row:row + 1], p[row:row + 1],
                                       z[row:row + 1], u[row:row + 1], vocab)[0][0]
        tokens[row] = token
    return tokens


def _draw_from_nucleus(x: np.ndarray, w: np.ndarray, z: float, p: float,
                       u: float) -> int | None:
    """Top-p and a draw for one row in O(vocab), without sorting the nucleus: the token of
    _truncate_and_draw over the whole sorted row, or None where that cannot be sure. w =
    exp(x - max(x)), z its sum. The weights go into buckets by their float32 bits (exponent and
    top 7 mantissa bits: a non-negative float's bits order like its value); the running mass of
    the buckets, best first, gives the bucket where the nucleus ends and the one the draw lands
    in, and only their tokens are sorted. Weights of one exponent sum exactly in float64, and
    so does every running sum down to the cut while it stays below 2^53 units of the cut
    bucket's last mantissa bit: then any summing order gives the sorted row's sums bit for bit.
    None where it does not (top_p within ~5e-4 of 1 over a long tail)."""
    # The tokens from the cut on weigh more than (1 - p) * z, so the cut weighs more than
    # (1 - p) * z / vocab (half that: z is a float32 sum). A peaked row has few tokens in the
    # buckets above this bound's and buckets only those (were the bound wrong, their running
    # mass would stop short of the threshold: None).
    bound = np.float32((1 - p) * z / (2 * w.size)).view(np.int32) >> _BUCKET_SHIFT
    heavy = w >= np.int32((bound + 1) << _BUCKET_SHIFT).view(np.float32)
    ids = None
    if np.count_nonzero(heavy) * 4 < w.size:
        ids = np.flatnonzero(heavy)
        x, w = x[ids], w[ids]
    bucket = _TOP_BUCKET - (w.view(np.int32) >> _BUCKET_SHIFT)  # weight 1's is 0
    # Given int32 buckets or float32 weights, bincount's own conversions cost 4x its counting.
    cum = np.cumsum(np.bincount(bucket.astype(np.intp), weights=w.astype(np.float64)))
    threshold = p * z
    cut = int(np.searchsorted(cum, threshold))  # the bucket of the last kept token
    exponent = (_TOP_BUCKET - cut) >> (23 - _BUCKET_SHIFT)  # biased, as in the bits
    # The cut bucket's last mantissa bit is 2^(exponent - 150): past 2^52 of them sums may round.
    if cut == cum.size or cum[cut] >= 2.0 ** (exponent - 150 + 52):
        return None

    def sorted_bucket(b: int) -> tuple[np.ndarray, np.ndarray]:
        """The bucket's tokens best first (value, then id, as _order_keys) and the running
        mass of the row up to each."""
        members = np.flatnonzero(bucket == b)
        tokens = members if ids is None else ids[members]
        order = np.argsort(_order_keys(x[members], tokens))
        before = cum[b - 1] if b else 0.0
        return tokens[order], before + np.cumsum(w[members[order]], dtype=np.float64)

    tokens, running = sorted_bucket(cut)
    target = u * running[np.searchsorted(running, threshold)]  # u of the kept mass, below it
    drawn = int(np.searchsorted(cum, target, side="right"))
    if drawn != cut:
        tokens, running = sorted_bucket(drawn)
    return int(tokens[np.searchsorted(running, target, side="right")])


def _truncate_and_draw(
    x: np.ndarray, k: np.ndarray, p: np.ndarray, z: np.ndarray, u: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k/top-p and a draw over the best `width` tokens (width >= every k). Returns the tokens
    and which rows are settled: a top-p-only row whose nucleus may reach past the candidates
    must retry wider."""
    vals, idx, count, complete = _best_tokens(x, width)
    rows = np.arange(len(x))
    e = np.exp(vals - vals[:, :1])
    has_k = k > 0
    kth = vals[rows, np.minimum(np.maximum(k, 1), count) - 1]
    e[has_k[:, None] & (vals < kth[:, None])] = 0.0
    cum = np.cumsum(e, axis=1, dtype=np.float64)
    length = count
    has_p = p < 1.0
    if has_p.any():
        # Keep each token whose better tokens hold less than top_p of the mass, i.e. up to the
        # first that brings the running sum to top_p.
        total = np.where(has_k, cum[:, -1], z)
        cut = np.count_nonzero(cum < (p * total)[:, None], axis=1) + 1
        length = np.where(has_p, np.minimum(cut, count), count)
    done = has_k | complete | (length < count) | (e[rows, count - 1] == 0.0)
    pos, _ = _inverse_cdf(cum, u, length)
    return idx[rows, pos], done


def _best_tokens(
    x: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the best `width` tokens plus any tied with the last of them, ordered by value
    descending then id ascending, padded with -inf: (values, ids, count, complete), where
    complete says every token of nonzero probability is among them. Pads' ids are invalid;
    their zero weight keeps them from being drawn."""
    n, vocab = x.shape
    if width >= vocab:
        keys = _order_keys(x, np.arange(vocab))
        count = np.full(n, vocab)
        complete = np.ones(n, dtype=bool)
    else:
        # Selecting the width-th smallest of -x, not the width-th largest of x: np.partition
        # crawls when a long run of equal values (min_p's -inf, a flat tail) lies before kth.
        kth = -np.partition(-x, width - 1, axis=1)[:, width - 1]
        complete = kth == -np.inf
        flat = np.flatnonzero((x >= kth[:, None]) & (x > -np.inf))
        row, col = np.divmod(flat, vocab)
        count = np.bincount(row, minlength=n)
        cols = int(count.max())
        slot = row * cols + np.arange(flat.size) - (np.cumsum(count) - count)[row]
        keys = np.full(n * cols, _PAD_KEY, dtype=np.int64)
        keys[slot] = _order_keys(x.reshape(-1)[flat], col)
        keys = keys.reshape(n, cols)
    keys.sort(axis=1)
    return _key_values(keys), keys & _LOW_32, count, complete


def _order_keys(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int64 keys whose ascending order is value descending, then token id ascending."""
    # Adding +0.0 turns -0.0 into +0.0, so equal values share one key.
    bits = (values + np.float32(0.0)).view(np.int32)
    # Flipping the magnitude bits of negative floats makes the int32s order like the floats.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (~ordered).astype(np.int64) * (1 << 32) + ids


def _key_values(keys: np.ndarray) -> np.ndarray:
    """The float32 logits back from _order_keys' keys (reading them is cheaper than a gather)."""
    ordered = ~(keys >> 32).astype(np.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(np.float32)
