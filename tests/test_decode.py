"""Generation: greedy, sampling and beam search over a step function that feeds its output back."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj

END, A, Bt, START = 0, 1, 2, 3


def markov(table):
    """A step function whose next-token distribution depends only on the last token: ``table[last]``."""
    logp = jnp.log(jnp.asarray(table))

    def step_fn(state, tokens):
        return state + 1, logp[tokens]

    return step_fn


# From START: A 0.6, B 0.4. After A: END 0.25, A 0.4, B 0.35. After B: END 1.0. END stays END.
# Greedy takes A then A (p = 0.24, unfinished); the best sequence of length 2 is B END (p = 0.4).
TABLE = [
    [1.0, 1e-9, 1e-9, 1e-9],
    [0.25, 0.4, 0.35, 1e-9],
    [1.0, 1e-9, 1e-9, 1e-9],
    [1e-9, 0.6, 0.4, 1e-9],
]


def test_greedy_misses_what_beam_search_finds():
    step = markov(TABLE)
    start = jnp.array([START])
    g = rj.decode.greedy(step, jnp.zeros(1), start, 2, end_token=END)
    np.testing.assert_array_equal(g.tokens, [[A, A]])
    assert int(g.lengths[0]) == 2 and float(g.state[0]) == 2
    beams = rj.decode.beam_search(step, jnp.zeros(1), start, 2, beam_size=2, end_token=END)
    np.testing.assert_array_equal(beams.tokens[0, 0], [Bt, END])
    np.testing.assert_allclose(beams.log_probs[0], np.log([0.4, 0.24]), rtol=1e-6)
    np.testing.assert_array_equal(beams.lengths[0], [2, 2])


def test_finished_sequences_repeat_end_token():
    step = markov(TABLE)
    beams = rj.decode.beam_search(step, jnp.zeros(1), jnp.array([START]), 5, beam_size=3, end_token=END)
    np.testing.assert_array_equal(beams.tokens[0, 0], [Bt, END, END, END, END])
    assert int(beams.lengths[0, 0]) == 2
    np.testing.assert_allclose(beams.log_probs[0, 0], np.log(0.4), rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_beam_of_one_is_greedy(seed):
    table = jax.nn.softmax(jax.random.normal(jax.random.key(seed), (5, 5)) * 3)
    step = markov(table)
    start = jnp.array([0, 1, 2, 3])
    g = rj.decode.greedy(step, jnp.zeros(4), start, 6, end_token=4)
    b = rj.decode.beam_search(step, jnp.zeros(4), start, 6, beam_size=1, end_token=4)
    np.testing.assert_array_equal(b.tokens[:, 0], g.tokens)
    np.testing.assert_array_equal(b.lengths[:, 0], g.lengths)


@pytest.mark.parametrize("seed", range(3))
def test_wide_beam_finds_the_brute_force_best(seed):
    """With a beam as wide as every prefix, beam search is exhaustive: compare with enumeration.

    The model is second-order: the next token depends on the input token *and* on the state (the token
    before it), so beams must carry their own state through every reordering.
    """
    V, L = 3, 3
    table = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(seed), (V, V, V)) * 2))
    logp = jnp.log(jnp.asarray(table))

    def step_fn(state, tokens):
        return tokens, logp[state, tokens]

    beams = rj.decode.beam_search(step_fn, jnp.array([1]), jnp.array([0]), L, beam_size=V**L)
    scores = {}
    for seq in itertools.product(range(V), repeat=L):
        prev2, prev, lp = 1, 0, 0.0
        for tok in seq:
            lp += np.log(table[prev2, prev, tok])
            prev2, prev = prev, tok
        scores[seq] = lp
    best = sorted(scores.items(), key=lambda kv: -kv[1])
    np.testing.assert_array_equal(beams.tokens[0, 0], best[0][0])
    np.testing.assert_allclose(beams.log_probs[0], [s for _, s in best], rtol=1e-5)
    # every returned beam's score is its own sequence's log-probability
    for k in range(V**L):
        seq = tuple(int(t) for t in beams.tokens[0, k])
        np.testing.assert_allclose(beams.log_probs[0, k], scores[seq], rtol=1e-5)


def test_length_penalty_prefers_longer_sequences():
    # a short sequence (END at once, p=0.45) vs longer ones of higher per-token probability (0.55)
    table = [[1.0, 1e-9, 1e-9], [0.45, 0.55, 1e-9], [1e-9, 1e-9, 1e-9]]
    step = markov(table)
    start = jnp.array([1])
    raw = rj.decode.beam_search(step, jnp.zeros(1), start, 4, beam_size=4, end_token=0)
    norm = rj.decode.beam_search(step, jnp.zeros(1), start, 4, beam_size=4, end_token=0, length_penalty=1.0)
    assert int(raw.lengths[0, 0]) == 1  # log 0.45 beats any longer product
    assert int(norm.lengths[0, 0]) > 1  # per-token averages favour the 0.55 continuations
    np.testing.assert_allclose(
        norm.scores[0], np.asarray(norm.log_probs[0]) / np.asarray(norm.lengths[0]), rtol=1e-6
    )


def test_sampling():
    table = jnp.array([[0.1, 0.2, 0.7]] * 3)
    step = markov(table)
    start = jnp.zeros(4000, jnp.int32)
    out = rj.decode.sample(step, jnp.zeros(4000), start, 1, jax.random.key(0))
    freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.03)
    cold = rj.decode.sample(step, jnp.zeros(4000), start, 1, jax.random.key(0), temperature=0.05)
    assert np.all(np.asarray(cold.tokens) == 2)
    top1 = rj.decode.sample(step, jnp.zeros(50), start[:50], 3, jax.random.key(1), top_k=1)
    np.testing.assert_array_equal(top1.tokens, np.full((50, 3), 2))
    top2 = rj.decode.sample(step, jnp.zeros(4000), start, 1, jax.random.key(2), top_k=2)
    freq = np.bincount(np.asarray(top2.tokens[:, 0]), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.0, 0.2 / 0.9, 0.7 / 0.9], atol=0.03)
    # jitted, and same key same tokens
    f = jax.jit(lambda k: rj.decode.sample(step, jnp.zeros(8), start[:8], 5, k, end_token=0).tokens)
    np.testing.assert_array_equal(f(jax.random.key(3)), f(jax.random.key(3)))


def test_decode_errors():
    step = markov(TABLE)
    with pytest.raises(ValueError, match=r"start_tokens must be an integer array \[B\], got shape \(1, 1\)"):
        rj.decode.greedy(step, jnp.zeros(1), jnp.array([[START]]), 2)
    with pytest.raises(ValueError, match=r"max_length must be an int >= 1, got 0"):
        rj.decode.greedy(step, jnp.zeros(1), jnp.array([START]), 0)
    with pytest.raises(ValueError, match=r"temperature must be > 0 .* got 0"):
        rj.decode.sample(step, jnp.zeros(1), jnp.array([START]), 2, jax.random.key(0), temperature=0)
    with pytest.raises(ValueError, match=r"beam_size must be an int >= 1, got 0"):
        rj.decode.beam_search(step, jnp.zeros(1), jnp.array([START]), 2, beam_size=0)
    with pytest.raises(
        ValueError, match=r"step_fn must return logits of shape \[B, V\] with B=1, got shape \(4,\)"
    ):
        rj.decode.greedy(lambda s, t: (s, jnp.zeros(4)), jnp.zeros(1), jnp.array([START]), 2)
