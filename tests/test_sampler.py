"""The sampler against plain per-row numpy references: filters, penalties, seeds, distributions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from nanovllm_onnx.engine import sampler as sampler_module
from nanovllm_onnx.engine.sampler import (
    Sampler,
    _apply_logit_bias,
    _apply_min_tokens,
    _apply_penalties,
)
from nanovllm_onnx.engine.sequence import Sequence
from nanovllm_onnx.sampling_params import SamplingParams

EOS = 7
# Ties: 0 and 9 share the top value, 1, 2 and 4 the next; 3 and 8 tie lower down.
LOGITS = np.array([2.0, 1.5, 1.5, 0.3, 1.5, -0.5, 0.9, -1.0, 0.3, 2.0, -3.0, 0.0], np.float32)
SMALL = np.array([1.0, 0.5, 0.0, -0.5, 2.0, 0.3, -1.0, 1.2], np.float32)


@pytest.fixture(autouse=True)
def no_float_warnings() -> Iterator[None]:
    """No division by zero, overflow or NaN anywhere in the sampler (underflow is fine)."""
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        yield


def make_seq(prompt: tuple[int, ...] = (1, 2, 3), output: tuple[int, ...] = (),
             **params: object) -> Sequence:
    seq = Sequence("req", list(prompt), SamplingParams(max_tokens=None, **params))
    for token in output:
        seq.append_token(token)
    return seq


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_probs(logits: np.ndarray, temperature: float = 1.0, min_p: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """vLLM V1's order written plainly for one row: temperature, min_p, top_k, top_p."""
    x = logits.astype(np.float64) / temperature
    if min_p > 0:
        probs = softmax(x)
        x = np.where(probs < min_p * probs.max(), -np.inf, x)
    if top_k > 0:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1:
        probs = softmax(x)
        keep = np.zeros(x.size, dtype=bool)
        mass = 0.0
        for i in np.argsort(-x, kind="stable"):  # equal logits: lower ids first
            if mass >= top_p:
                break
            keep[i] = True
            mass += probs[i]
        x = np.where(keep, x, -np.inf)
    return softmax(x)


def draw(logits: np.ndarray, num: int, rows: int = 2000, **params: object) -> np.ndarray:
    """`num` draws for one row of logits: `rows` seeded sequences sampled num / rows times."""
    seqs = [make_seq(seed=1000 + i, **params) for i in range(rows)]
    sampler = Sampler([EOS])
    return np.concatenate([sampler(np.tile(logits, (rows, 1)), seqs)[0]
                           for _ in range(num // rows)])


# ---- filters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    ({"top_k": 1}, {0, 9}),  # both tied at the top stay
    ({"top_k": 3}, {0, 9, 1, 2, 4}),  # every token tied with the 3rd value stays
    ({"top_p": 0.5}, {0, 9, 1}),  # a tie split by top-p keeps the lower ids
    ({"top_p": 0.6}, {0, 9, 1, 2}),
    ({"top_p": 0.9}, {0, 9, 1, 2, 4, 6, 3}),
    ({"min_p": 0.3}, {0, 9, 1, 2, 4, 6}),
    ({"temperature": 0.8, "min_p": 0.1, "top_k": 7, "top_p": 0.8}, None),
    ({"temperature": 1.5, "top_k": 8, "top_p": 0.95}, None),
])
def test_filters_keep_exactly_the_reference_set(params: dict, expected: set[int] | None) -> None:
    ref = reference_probs(LOGITS, **params)
    support = set(np.flatnonzero(ref).tolist())
    if expected is not None:
        assert support == expected
    assert ref[ref > 0].min() > 0.01  # so 4000 draws surely hit every kept token
    assert set(draw(LOGITS, 4000, **params).tolist()) == support


def test_min_p_applies_before_top_p() -> None:
    """vLLM V1 runs min_p first: top-p then sees the renormalized survivors."""
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    params = {"min_p": 0.5, "top_p": 0.6}
    assert set(np.flatnonzero(reference_probs(logits, **params)).tolist()) == {0}
    assert set(draw(logits, 400, rows=200, **params).tolist()) == {0}


@pytest.fixture
def narrow_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-p tries 16 candidates before it buckets the row: both on a small vocab."""
    monkeypatch.setattr(sampler_module, "_FIRST_CANDIDATES", 16)


@pytest.mark.usefixtures("narrow_candidates")
def test_top_p_nucleus_wider_than_the_first_candidates() -> None:
    """About 90 tokens in the nucleus: more than the candidates."""
    rng = np.random.default_rng(0)
    vocab = 600
    logits = rng.uniform(-6.0, -4.0, vocab).astype(np.float32)
    likely = rng.choice(vocab, 100, replace=False)
    logits[likely] = rng.uniform(5.0, 5.5, likely.size)
    support = set(np.flatnonzero(reference_probs(logits, top_p=0.9)).tolist())
    assert 64 < len(support) < 100
    assert set(draw(logits, 4000, top_p=0.9).tolist()) == support


@pytest.mark.usefixtures("narrow_candidates")
def test_top_p_over_almost_the_whole_vocabulary() -> None:
    """Nearly flat logits: the nucleus holds most of the vocabulary."""
    rng = np.random.default_rng(1)
    logits = rng.uniform(0, 0.01, 600).astype(np.float32)
    kept = reference_probs(logits, top_p=0.95) > 0
    drawn = draw(logits, 4000, top_p=0.95)
    assert kept.sum() > 256
    assert kept[drawn].all()
    assert len(set(drawn.tolist())) > 500


def sorted_row_draw(x: np.ndarray, u: float, top_k: int = 0, top_p: float = 1.0) -> int:
    """The sampler's top-k/top-p draw written as one full sort of the row: tokens best first
    (value, then lower id), float32 weights exp(x - max), float64 running sums; top-p keeps up
    to the token whose running sum reaches top_p of the mass (the whole row's float32 sum, or
    the top-k set's), and the draw takes the first kept token whose running sum exceeds u of
    the kept mass."""
    order = np.lexsort((np.arange(x.size), -x))
    w = np.exp(x - x.max())
    running = np.cumsum(w[order], dtype=np.float64)
    total = float(w.sum())
    if top_k:
        keep = np.count_nonzero(x >= x[order[top_k - 1]])
        running, total = running[:keep], running[keep - 1]
    last = int(np.searchsorted(running, top_p * total)) if top_p < 1 else running.size - 1
    last = min(last, int(np.searchsorted(running, running[-1])))  # the last weighted one
    target = u * running[last]
    return int(order[min(int(np.searchsorted(running, target, side="right")), last)])


@pytest.mark.parametrize("shape, params", [
    ("flat", {"top_p": 0.9}),
    ("flat", {"top_p": 0.5}),
    ("flat", {"top_p": 0.999}),
    ("flat", {"top_k": 3000, "top_p": 0.9}),
    ("spread", {"top_p": 0.95}),  # p * z < 256: the candidates first, then the buckets
    ("peaked", {"top_p": 0.9}),  # the candidates alone
    ("peaked, large vocabulary", {"top_p": 0.9}),  # the buckets first
    ("peaked", {"top_k": 50, "top_p": 0.95}),
    ("ties", {"top_p": 0.8}),
    ("island", {"top_p": 0.9}),  # 2,000 likely tokens: only they are bucketed
    ("tail", {"top_p": 0.9999999}),  # the cut deep in a tail: float64 sums round, full sort
    ("equal", {"top_p": 0.5}),  # 1,024 tied tokens: the cut and the draw inside one bucket
])
def test_top_p_draws_the_sorted_rows_token(shape: str, params: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each u in [0, 1) draws exactly the token of the full sort: the kept set's edge (u just
    below 1 draws the last kept token) and every place in between, on rows whose nucleus holds
    most of the vocabulary, thousands of tokens (first the candidates, then the buckets), or
    tens (the candidates alone), or sums past float64's exact range (the buckets, then a sort)."""
    rng = np.random.default_rng(7)
    vocab = 20000
    if shape == "peaked, large vocabulary":
        monkeypatch.setattr(sampler_module, "_BUCKETS_FIRST_VOCAB", vocab)
    x = {
        "flat": rng.normal(size=vocab) * 0.5,
        "spread": rng.normal(size=vocab) * 2,
        "peaked": rng.normal(size=vocab) * 6,
        "peaked, large vocabulary": rng.normal(size=vocab) * 6,
        "ties": np.round(rng.normal(size=vocab) * 4) / 4,  # runs of equal logits
        "island": np.where(rng.permutation(vocab) < 2000, rng.normal(size=vocab) * 0.5,
                           rng.normal(size=vocab) - 20),
        "tail": np.r_[0.0, rng.uniform(-25.01, -25, vocab - 1)],
        "equal": np.where(rng.permutation(vocab) < 1024, 0.0, -np.inf),
    }[shape].astype(np.float32)
    drawn: list[int | None] = []
    buckets = sampler_module._draw_from_nucleus
    monkeypatch.setattr(sampler_module, "_draw_from_nucleus",
                        lambda *a: drawn.append(buckets(*a)) or drawn[-1])
    u = np.r_[0.0, rng.random(60), 1 - 2.0 ** -53, 0.5]
    sp = SamplingParams(max_tokens=None, **params)
    tokens = sampler_module._sample(np.tile(x, (u.size, 1)), np.ones(u.size, np.float32),
                                    [sp] * u.size, u)
    expected = [sorted_row_draw(x, ui, sp.top_k, sp.top_p) for ui in u]
    assert tokens.tolist() == expected
    # Which way each row went: the buckets' exact sums, or the sort where they could round.
    assert len(drawn) == (0 if sp.top_k or shape == "peaked" else u.size)
    assert (None in drawn) == (shape == "tail")


# ---- greedy ------------------------------------------------------------------------------------

def test_greedy_is_argmax_and_never_divides_by_zero() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(16, 5000)).astype(np.float32)
    sampler = Sampler([EOS])
    tokens, logprobs = sampler(logits.copy(), [make_seq(temperature=0.0) for _ in range(16)])
    assert tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, logits.argmax(axis=1))
    assert logprobs == [None] * 16

    # The general path: greedy rows beside sampled ones, one below vLLM's 1e-5 greedy threshold.
    seqs = [make_seq(temperature=0.0) if i % 2 else make_seq(temperature=0.9, top_p=0.8)
            for i in range(15)] + [make_seq(temperature=1e-7)]
    tokens, _ = sampler(logits.copy(), seqs)
    greedy = [i for i in range(16) if i % 2 or i == 15]
    np.testing.assert_array_equal(tokens[greedy], logits[greedy].argmax(axis=1))


# ---- penalties, logit_bias, min_tokens --------------------------------------------------------

def test_penalties_change_exactly_the_right_logits() -> None:
    rng = np.random.default_rng(3)
    vocab = 40
    logits = (rng.normal(size=(3, vocab)) * 3).astype(np.float32)
    logits[0, 2] = 0.0  # zero stays zero under the repetition penalty
    seqs = [
        make_seq(prompt=(1, 2, 2, 5, 10), output=(5, 5, 6, 10, 11, 11, 11),
                 repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        make_seq(prompt=(20, 21), output=(21, 22, 22), repetition_penalty=0.8),
        make_seq(prompt=(30,), output=(31, 31), presence_penalty=-0.7, frequency_penalty=1.5),
    ]
    out = logits.copy()
    _apply_penalties(out, seqs)

    ref = logits.copy()
    for row, seq in enumerate(seqs):
        p = seq.params
        for t in set(seq.token_ids):  # repetition: prompt and output tokens
            v = ref[row, t]
            ref[row, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t, c in Counter(seq.output_token_ids).items():  # the others: output tokens only
            ref[row, t] -= p.frequency_penalty * c + p.presence_penalty
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    untouched = np.ones_like(logits, dtype=bool)
    for row, seq in enumerate(seqs):
        untouched[row, seq.token_ids] = False
    np.testing.assert_array_equal(out[untouched], logits[untouched])
    assert out[0, 2] == 0.0


def test_presence_penalty_ignores_prompt_but_repetition_does_not() -> None:
    logits = np.array([[0.0, 5.0, 4.8, 1.0]], np.float32)
    sampler = Sampler([EOS])
    assert sampler(logits.copy(), [make_seq(prompt=(1,), temperature=0.0,
                                            presence_penalty=0.5)])[0][0] == 1
    assert sampler(logits.copy(), [make_seq(prompt=(0,), output=(1,), temperature=0.0,
                                            presence_penalty=0.5)])[0][0] == 2
    assert sampler(logits.copy(), [make_seq(prompt=(1,), temperature=0.0,
                                            repetition_penalty=1.1)])[0][0] == 2


def test_logit_bias() -> None:
    logits = np.zeros((2, 10), np.float32)
    seqs = [make_seq(temperature=0.0, logit_bias={3: 5.0, 4: -1.0}), make_seq(temperature=0.0)]
    out = logits.copy()
    _apply_logit_bias(out, [s.params for s in seqs])
    expected = logits.copy()
    expected[0, 3], expected[0, 4] = 5.0, -1.0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(Sampler([EOS])(logits.copy(), seqs)[0], [3, 0])
    with pytest.raises(ValueError, match="vocabulary"):
        Sampler([EOS])(logits.copy(), [make_seq(logit_bias={10: 1.0})])


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached() -> None:
    logits = np.zeros((1, 12), np.float32)
    logits[0, [EOS, 9, 8, 2]] = [5.0, 4.5, 4.0, 3.0]  # 9: a second EOS id, 8: a stop id
    sampler = Sampler([EOS, 9])

    out = np.zeros((2, 12), np.float32)
    _apply_min_tokens(out, [1], [[EOS, 9, 8]])
    assert np.isneginf(out[1, [EOS, 9, 8]]).all()
    assert np.count_nonzero(out) == 3

    for ignore_eos in (False, True):  # vLLM suppresses EOS below min_tokens even with ignore_eos
        seq = make_seq(temperature=0.0, min_tokens=2, stop_token_ids=[8], ignore_eos=ignore_eos)
        tokens = []
        for _ in range(3):
            tokens.append(int(sampler(logits.copy(), [seq])[0][0]))
            seq.append_token(tokens[-1])
        assert tokens == [2, 2, EOS]


# ---- randomness --------------------------------------------------------------------------------

def test_seeded_rows_match_alone_and_in_any_batch() -> None:
    rng = np.random.default_rng(4)
    vocab = 6000
    logits = (rng.normal(size=(4, vocab)) * 0.5).astype(np.float32)  # flat: top-p widens
    configs = [
        {"seed": 11, "top_p": 0.9},
        {"seed": 12, "temperature": 0.7},
        {"seed": 13, "top_k": 5000, "top_p": 0.95},  # starts the batch at a wider width
        {"seed": 14, "min_p": 0.3, "top_p": 0.8, "repetition_penalty": 1.2},
    ]
    steps = 5
    alone = []
    for row, cfg in enumerate(configs):
        seq, sampler = make_seq(**cfg), Sampler([EOS])
        for _ in range(steps):
            seq.append_token(int(sampler(logits[row:row + 1].copy(), [seq])[0][0]))
        alone.append(seq.output_token_ids)

    seqs = [make_seq(**cfg) for cfg in configs]
    batch = [make_seq(top_p=0.5), seqs[2], make_seq(temperature=0.0), seqs[0],
             make_seq(seed=99, top_k=3), seqs[3], make_seq(), seqs[1]]
    sampler = Sampler([EOS])
    for _ in range(steps):
        rows = rng.normal(size=(len(batch), vocab)).astype(np.float32)
        for i, seq in enumerate(batch):
            if seq in seqs:
                rows[i] = logits[seqs.index(seq)]
        for seq, token in zip(batch, sampler(rows, batch)[0], strict=True):
            seq.append_token(int(token))
    assert [seq.output_token_ids for seq in seqs] == alone


def test_unseeded_runs_differ() -> None:
    logits = np.zeros((64, 1000), np.float32)
    seqs = [make_seq() for _ in range(64)]
    sampler = Sampler([EOS])
    first, second = sampler(logits.copy(), seqs)[0], sampler(logits.copy(), seqs)[0]
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, Sampler([EOS])(logits.copy(), seqs)[0])


@pytest.mark.parametrize("params", [
    {},
    {"temperature": 0.7},
    {"top_k": 3},
    {"top_p": 0.8},
    {"top_k": 5, "top_p": 0.9, "min_p": 0.1, "temperature": 1.3},
])
def test_distribution_matches_softmax(params: dict) -> None:
    freq = np.bincount(draw(SMALL, 20000, **params), minlength=SMALL.size) / 20000
    assert 0.5 * np.abs(freq - reference_probs(SMALL, **params)).sum() < 0.02


def test_distribution_over_vocabulary_blocks() -> None:
    """A vocabulary of several blocks, likely tokens on both sides of block edges."""
    logits = np.full(700, -4.0, np.float32)
    heavy = [5, 250, 255, 256, 511, 512, 600, 699]
    logits[heavy] = [2.0, 3.0, 2.5, 4.0, 3.5, 2.2, 3.1, 2.7]
    ref = reference_probs(logits)
    freq = np.bincount(draw(logits, 20000), minlength=700) / 20000
    # The light tokens are too many to estimate one by one: compare them as one group.
    observed = np.append(freq[heavy], 1 - freq[heavy].sum())
    expected = np.append(ref[heavy], 1 - ref[heavy].sum())
    assert 0.5 * np.abs(observed - expected).sum() < 0.02



def test_full_vocabulary_draw_inverts_the_cdf_in_token_order() -> None:
    """The draw over the whole vocabulary (ops.cc's, through ctypes) gives for each uniform u
    the token where u falls in the running sum of the softmax weights in token-id order, across
    block edges and a last partial block (1,000 tokens: 3 blocks of 256 and one of 232); a
    token at -inf (masked) is never drawn, even where u lands on its place."""
    rng = np.random.default_rng(5)
    rows, vocab = 64, 1000
    x = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    masked = rng.random((rows, vocab)) < 0.2
    x[masked] = -np.inf
    u = rng.random(rows)
    probs = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    expected = np.array([np.searchsorted(c, v, side="right") for c, v in zip(cum, u)])
    clear = np.array([np.abs(c - v).min() > 1e-5 for c, v in zip(cum, u)])  # off the edges
    tokens = sampler_module._sample_full(x, u)
    np.testing.assert_array_equal(tokens[clear], expected[clear])
    assert clear.sum() > rows * 0.9
    # u at each masked token's place in the running sum: the next unmasked token instead
    row = x[0]
    for token in np.flatnonzero(masked[0])[:20]:
        at = np.full(8, cum[0][token - 1] if token else 0.0)
        drawn = sampler_module._sample_full(np.repeat(row[None], 8, axis=0), at)
        assert not masked[0][drawn].any()

# ---- logprobs ----------------------------------------------------------------------------------

def test_logprobs_hold_top_n_and_the_sampled_token_from_raw_logits() -> None:
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(3, 300)) * 2).astype(np.float32)
    low = int(logits[0].argmin())
    seqs = [
        # The bias makes the worst raw token the sampled one: its logprob must still be raw.
        make_seq(logprobs=3, temperature=0.7, top_k=20, repetition_penalty=1.2,
                 logit_bias={low: 100.0}),
        make_seq(logprobs=0, temperature=0.0),
        make_seq(temperature=0.0),
    ]
    tokens, logprobs = Sampler([EOS])(logits.copy(), seqs)
    x = logits.astype(np.float64)
    ref = x - x.max(axis=1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(axis=1, keepdims=True))

    assert tokens[0] == low
    top3 = np.argsort(-ref[0])[:3].tolist()
    assert set(logprobs[0]) == {*top3, low}
    for token, value in logprobs[0].items():
        assert value == pytest.approx(ref[0, token], abs=1e-5)
    assert logprobs[1] == {int(tokens[1]): pytest.approx(ref[1, tokens[1]], abs=1e-5)}
    assert logprobs[2] is None


def test_rows_sampled_in_parts_on_threads_match_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch split into parts on several threads gives each seeded row the token that one
    call over the whole batch gives, step after step (every filter, greedy rows between)."""
    monkeypatch.setattr(sampler_module, "_MIN_PART", 1)  # split even a small batch
    configs = [{}, {"temperature": 0.7}, {"top_k": 20}, {"top_p": 0.9}, {"temperature": 0.0},
               {"min_p": 0.05, "top_p": 0.8, "temperature": 1.3}, {"top_k": 5, "top_p": 0.5}]
    logits = (np.random.default_rng(3).normal(size=(4, 11, 3000)) * 3).astype(np.float32)

    def tokens(num_threads: int) -> list[list[int]]:
        seqs = [make_seq(seed=100 + i, **configs[i % len(configs)]) for i in range(11)]
        sampler = Sampler([EOS], num_threads)
        for step in logits:
            for seq, token in zip(seqs, sampler(step.copy(), seqs)[0], strict=True):
                seq.append_token(int(token))
        assert (sampler._workers is None) == (num_threads == 1)
        return [seq.output_token_ids for seq in seqs]

    assert tokens(3) == tokens(1)
