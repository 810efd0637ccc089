"""Sequence losses: masked cross-entropy and squared error, and CTC against a brute-force sum over alignments."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compilations

import rnnjax as rj

B, T, V = 3, 5, 4
LENGTHS = jnp.array([5, 2, 0])


def test_sequence_cross_entropy(key):
    logits = jax.random.normal(key, (B, T, V), jnp.float64) * 3
    targets = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    loss = rj.losses.sequence_cross_entropy(logits, targets, LENGTHS)
    lp = np.asarray(jax.nn.log_softmax(logits))
    by_hand = [-lp[b, t, targets[b, t]] for b in range(B) for t in range(int(LENGTHS[b]))]
    np.testing.assert_allclose(loss, np.mean(by_hand), rtol=1e-14)
    # padding gets no gradient, and is not counted
    g = jax.grad(rj.losses.sequence_cross_entropy)(logits, targets, LENGTHS)
    assert np.all(np.asarray(g[1, 2:]) == 0) and np.all(np.asarray(g[2]) == 0)
    # stable for huge logits
    big = rj.losses.sequence_cross_entropy(logits * 1e4, targets, LENGTHS)
    assert bool(jnp.isfinite(big))
    # no valid step at all: 0, not nan
    assert float(rj.losses.sequence_cross_entropy(logits, targets, jnp.zeros(B, jnp.int32))) == 0.0


def test_squared_error(key):
    p = jax.random.normal(key, (B, T, 2), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (B, T, 2), jnp.float64)
    mask = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
    by_hand = np.sum((np.asarray(p) - np.asarray(y)) ** 2 * mask[..., None]) / (mask.sum() * 2)
    np.testing.assert_allclose(rj.losses.squared_error(p, y, LENGTHS), by_hand, rtol=1e-14)
    np.testing.assert_allclose(
        rj.losses.squared_error(p, y), np.mean((np.asarray(p) - np.asarray(y)) ** 2), rtol=1e-14
    )


def brute_force_ctc(log_probs, label, blank=0):
    """−log Σ over every frame-level path that collapses (merge repeats, drop blanks) to ``label``."""
    T, K = log_probs.shape
    total = -np.inf
    for path in itertools.product(range(K), repeat=T):
        collapsed = [k for i, k in enumerate(path) if k != blank and (i == 0 or path[i - 1] != k)]
        if collapsed == list(label):
            total = np.logaddexp(total, sum(log_probs[t, k] for t, k in enumerate(path)))
    return -total


@pytest.mark.parametrize("seed", range(3))
def test_ctc_matches_brute_force(seed):
    K = 3
    logits = jax.random.normal(jax.random.key(seed), (3, 4, K), jnp.float64)
    labels = jnp.array([[1, 2, 0], [1, 1, 0], [2, 0, 0]])
    label_lengths = jnp.array([2, 2, 1])
    lengths = jnp.array([4, 4, 3])
    loss = rj.losses.ctc(logits, lengths, labels, label_lengths)
    lp = np.asarray(jax.nn.log_softmax(logits))
    expected = [
        brute_force_ctc(lp[b, : int(lengths[b])], np.asarray(labels[b, : int(label_lengths[b])]))
        for b in range(3)
    ]
    np.testing.assert_allclose(loss, expected, rtol=1e-9)


def test_loss_errors(key):
    logits = jnp.zeros((B, T, V))
    with pytest.raises(ValueError, match=r"targets must have shape \[B, T\] = \(3, 5\), got shape \(3, 4\)"):
        rj.losses.sequence_cross_entropy(logits, jnp.zeros((B, 4), jnp.int32))
    with pytest.raises(TypeError, match=r"targets must be integer class ids, got dtype float32"):
        rj.losses.sequence_cross_entropy(logits, jnp.zeros((B, T), jnp.float32))
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \(3,\), got shape \(2,\)"):
        rj.losses.sequence_cross_entropy(logits, jnp.zeros((B, T), jnp.int32), jnp.array([1, 2]))
    with pytest.raises(
        ValueError, match=r"targets must have the shape of predictions \(3, 5, 4\), got \(3, 5, 3\)"
    ):
        rj.losses.squared_error(logits, jnp.zeros((B, T, 3)))
    with pytest.raises(ValueError, match=r"labels must have shape \[B, N\] with B=3, got shape \(2, 2\)"):
        rj.losses.ctc(logits, None, jnp.zeros((2, 2), jnp.int32), jnp.array([1, 1]))


def test_eager_losses_compile_one_program_each(caplog):
    """Dispatched operation by operation, sequence_cross_entropy took 28 compilations and ctc 46."""
    # shapes that no other test uses, so that nothing is cached from them
    logits = jax.random.normal(jax.random.key(0), (3, 13, 6), jnp.float64)
    lengths = jnp.array([13, 5, 0])
    targets = jnp.zeros((3, 13), jnp.int32)
    xent = compilations(caplog, rj.losses.sequence_cross_entropy, logits, targets, lengths)
    assert len(xent) <= 1, xent
    assert len(compilations(caplog, rj.losses.squared_error, logits, logits + 1, lengths)) <= 2
    labels, label_lengths = jnp.array([[1, 2], [3, 0], [0, 0]]), jnp.array([2, 1, 0])
    assert len(compilations(caplog, rj.losses.ctc, logits, lengths, labels, label_lengths)) <= 1
