"""Data helpers: pad_sequences, bucket_by_length and unbucket round-trip, and feed rj.unroll faithfully."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnjax as rj


@settings(max_examples=60)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    features=st.sampled_from([(), (3,), (2, 1)]),
    max_length=st.none() | st.integers(0, 10),
    truncating=st.sampled_from(["post", "pre"]),
    value=st.sampled_from([0.0, -1.5, float("nan")]),
)
def test_pad_sequences_round_trip(lengths, features, max_length, truncating, value):
    rng = np.random.default_rng(len(lengths))
    seqs = [rng.normal(size=(t, *features)).astype(np.float32) for t in lengths]
    xs, out_lengths = rj.pad_sequences(seqs, max_length=max_length, truncating=truncating, value=value)
    T = max(lengths) if max_length is None else max_length
    assert xs.shape == (len(seqs), T, *features) and xs.dtype == np.float32
    assert out_lengths.dtype == np.int32 and out_lengths.tolist() == [min(t, T) for t in lengths]
    for b, (s, n) in enumerate(zip(seqs, out_lengths, strict=True)):
        kept = s[:n] if truncating == "post" else s[len(s) - n :]
        np.testing.assert_array_equal(xs[b, :n], kept)
        np.testing.assert_array_equal(xs[b, n:], np.full_like(xs[b, n:], value))


def test_pad_sequences_dtypes_and_inputs():
    xs, lengths = rj.pad_sequences([jnp.arange(3, dtype=jnp.int32), np.array([7], np.int32), []], value=-1)
    assert xs.dtype == np.int32 and xs.tolist() == [[0, 1, 2], [7, -1, -1], [-1, -1, -1]]
    assert lengths.tolist() == [3, 1, 0]
    xs, _ = rj.pad_sequences((np.ones(2, np.float64), np.ones(1, np.float32)), dtype=jnp.bfloat16)
    assert xs.dtype == jnp.bfloat16 and xs.tolist() == [[1, 1], [1, 0]]
    xs, lengths = rj.pad_sequences([np.ones((2, 4))], max_length=5)
    assert xs.shape == (1, 5, 4) and lengths.tolist() == [2]
    xs, lengths = rj.pad_sequences([[1, 2], [3]], max_length=3)  # nested lists: NumPy's dtype
    assert xs.dtype == np.int64 and xs.tolist() == [[1, 2, 0], [3, 0, 0]] and lengths.tolist() == [2, 1]
    xs, lengths = rj.pad_sequences([[True, True], [True]])
    assert xs.dtype == np.bool_ and xs.tolist() == [[True, True], [True, False]]


def test_pad_sequences_errors():
    with pytest.raises(ValueError, match=r"seqs must hold at least one sequence, got an empty list"):
        rj.pad_sequences([])
    with pytest.raises(
        TypeError, match=r"seqs must be a list or tuple of \[T_i, \.\.\.\] arrays, got ndarray"
    ):
        rj.pad_sequences(np.zeros((2, 3)))
    with pytest.raises(
        ValueError,
        match=r"seqs must share one feature shape \[T_i, \.\.\.\]: seqs\[0\] has shape \(2, 3\) "
        r"and seqs\[1\] has shape \(4, 2\)",
    ):
        rj.pad_sequences([np.zeros((2, 3)), np.zeros((4, 2))])
    with pytest.raises(
        ValueError, match=r"seqs\[1\] must have a time axis, shape \[T_i, \.\.\.\], got a scalar"
    ):
        rj.pad_sequences([np.zeros(2), 3.0])
    with pytest.raises(TypeError, match=r"seqs\[0\] must be a numeric array, got dtype <U1"):
        rj.pad_sequences([np.array(["a", "b"])])
    with pytest.raises(
        TypeError,
        match=r"seqs must share one dtype when dtype=None: seqs\[0\] is float32 and seqs\[1\] is float64; "
        r"pass dtype= to convert them",
    ):
        rj.pad_sequences([np.zeros(2, np.float32), np.zeros(3, np.float64)])
    with pytest.raises(TypeError, match=r"dtype must be a numeric or bool dtype, got <U3"):
        rj.pad_sequences([np.zeros(2)], dtype="U3")
    with pytest.raises(
        ValueError,
        match=r"padding must be one of \('post',\), got 'pre': rnnjax's lengths mark the first lengths\[b\] "
        r"steps as valid.*reverse=True",
    ):
        rj.pad_sequences([np.zeros(2)], padding="pre")
    with pytest.raises(ValueError, match=r"padding must be one of \('post',\), got 'left'$"):
        rj.pad_sequences([np.zeros(2)], padding="left")
    with pytest.raises(ValueError, match=r"truncating must be one of \('post', 'pre'\), got 'end'"):
        rj.pad_sequences([np.zeros(2)], truncating="end")
    with pytest.raises(TypeError, match=r"max_length must be an int or None, got float"):
        rj.pad_sequences([np.zeros(2)], max_length=2.0)
    with pytest.raises(ValueError, match=r"max_length must be >= 0, got -1"):
        rj.pad_sequences([np.zeros(2)], max_length=-1)
    for value in (float("nan"), 0.5, 300, "x", [0, 1]):
        with pytest.raises(TypeError, match=r"value must be a scalar representable in dtype int8, got"):
            rj.pad_sequences([np.zeros(2, np.int8)], value=value)


@st.composite
def bucketing(draw):
    lengths = draw(st.lists(st.integers(0, 30), min_size=0, max_size=40))
    batch_size = draw(st.integers(1, 8))
    boundaries = draw(
        st.none() | st.lists(st.integers(1, 31), min_size=1, max_size=4, unique=True).map(sorted)
    )
    seed = draw(st.none() | st.integers(0, 3))
    return np.array(lengths, np.int64), batch_size, boundaries, seed


@settings(max_examples=25)
@given(bucketing())
def test_bucket_by_length_partitions_and_unbucket_inverts(problem):
    lengths, batch_size, boundaries, seed = problem
    key = None if seed is None else jax.random.key(seed)
    batches = rj.bucket_by_length(lengths, batch_size, boundaries=boundaries, shuffle_key=key)
    # every sequence in exactly one batch, no batch empty or too big
    assert sorted(np.concatenate([*batches, np.zeros(0, np.int64)]).tolist()) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size and b.dtype == np.int64 for b in batches)
    if boundaries is None:
        # sorted by length: batches' ranges never interleave (after putting them in length order)
        spans = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
        assert all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(spans))
    else:
        for b in batches:  # one bucket per batch; within it, at most one batch is not full
            assert len(set(np.searchsorted(boundaries, lengths[b], side="right").tolist())) == 1
        per_bucket = np.bincount(
            np.searchsorted(boundaries, lengths, side="right"), minlength=len(boundaries) + 1
        )
        assert len(batches) == sum(-(-n // batch_size) for n in per_bucket)
    if key is None and batches:  # shortest first: by length, or by bucket
        firsts = [lengths[b].min() for b in batches]
        if boundaries is not None:
            firsts = np.searchsorted(boundaries, firsts, side="right").tolist()
        assert firsts == sorted(firsts)
    if batches:
        # per-batch results come back in the data set's order, as NumPy, and for pytrees of JAX arrays
        np.testing.assert_array_equal(rj.unbucket(batches, [lengths[b] for b in batches]), lengths)
        joined = rj.unbucket(batches, [(jnp.asarray(lengths[b]), {"twice": 2 * lengths[b]}) for b in batches])
        assert isinstance(joined[0], jax.Array) and isinstance(joined[1]["twice"], np.ndarray)
        np.testing.assert_array_equal(joined[0], lengths)
        np.testing.assert_array_equal(joined[1]["twice"], 2 * lengths)


def test_bucket_by_length_shuffles_by_key():
    lengths = np.arange(40) % 7
    same = [rj.bucket_by_length(lengths, 4, shuffle_key=jax.random.key(1)) for _ in range(2)]
    other = rj.bucket_by_length(lengths, 4, shuffle_key=jax.random.key(2))
    plain = rj.bucket_by_length(lengths, 4)
    assert [b.tolist() for b in same[0]] == [b.tolist() for b in same[1]]
    assert [b.tolist() for b in same[0]] != [b.tolist() for b in other]
    assert [b.tolist() for b in same[0]] != [b.tolist() for b in plain]
    # sorted either way: a batch never spans more lengths than the sorted order forces
    assert max(np.ptp(lengths[b]) for b in same[0]) <= 1


def test_bucket_and_unbucket_errors():
    with pytest.raises(TypeError, match=r"lengths must be an integer array \[N\], got dtype float64"):
        rj.bucket_by_length([1.5, 2.0], 2)
    with pytest.raises(ValueError, match=r"lengths must have shape \[N\], got shape \(2, 1\)"):
        rj.bucket_by_length([[1], [2]], 2)
    with pytest.raises(ValueError, match=r"lengths must be >= 0, got -3 at index 1"):
        rj.bucket_by_length([1, -3], 2)
    with pytest.raises(TypeError, match=r"batch_size must be an int, got float"):
        rj.bucket_by_length([1, 2], 2.0)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        rj.bucket_by_length([1, 2], 0)
    for boundaries in ([5, 5], [0, 3], [3.5], [[2]]):
        with pytest.raises(
            ValueError, match=r"boundaries must be strictly increasing positive integers, got"
        ):
            rj.bucket_by_length([1, 2], 2, boundaries=boundaries)

    batches = [np.array([1, 0]), np.array([2])]
    with pytest.raises(ValueError, match=r"outputs must have one entry per batch, 2, got 1"):
        rj.unbucket(batches, [np.zeros(2)])
    with pytest.raises(ValueError, match=r"batches must hold at least one batch, got none"):
        rj.unbucket([], [])
    with pytest.raises(
        ValueError, match=r"batches must hold each index 0 \.\. N-1 exactly once \(N = 3\), got \[2\] missing"
    ):
        rj.unbucket([np.array([1, 0]), np.array([0])], [np.zeros(2), np.zeros(1)])
    with pytest.raises(
        ValueError, match=r"outputs\[1\] must have a leading axis of batches\[1\]'s size 1, got shape \(2,\)"
    ):
        rj.unbucket(batches, [np.zeros(2), np.zeros(2)])
    with pytest.raises(
        ValueError,
        match=r"outputs must agree on their trailing shapes: outputs\[0\] has \(2, 5\) and outputs\[1\] has "
        r"\(1, 4\); pad every batch to one max_length",
    ):
        rj.unbucket(batches, [np.zeros((2, 5)), np.zeros((1, 4))])
    with pytest.raises(ValueError, match=r"outputs must share one pytree structure"):
        rj.unbucket(batches, [(np.zeros(2),), [np.zeros(1)]])


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_padded_and_bucketed_batches_give_each_sequence_its_own_result(key, reverse):
    """rj.unroll over pad_sequences' batch (lengths=) gives every sequence the outputs and final carry it
    gets alone; bucketed batches, each padded to its own longest, and unbucket give the same final carries."""
    cell = rj.lstm(5)
    params = cell.init(key, input_size=3, dtype=jnp.float64)
    lengths = [6, 1, 4, 0, 9, 3, 4]
    keys = jax.random.split(jax.random.key(1), len(lengths))
    seqs = [jax.random.normal(k, (t, 3), jnp.float64) for k, t in zip(keys, lengths, strict=True)]
    alone = [rj.unroll(cell, params, s[None], reverse=reverse) for s in seqs]

    xs, lens = rj.pad_sequences(seqs, value=np.nan)  # the padding never reaches a result, NaN included
    carry, ys = rj.unroll(cell, params, xs, lengths=lens, reverse=reverse)
    for b, (c, y) in enumerate(alone):
        assert rel_err(ys[b, : lengths[b]], y[0]) <= 1e-12
        assert not np.any(ys[b, lengths[b] :])
        assert rel_err(jax.tree.map(lambda a, b=b: a[b], carry), jax.tree.map(lambda a: a[0], c)) <= 1e-12

    batches = rj.bucket_by_length(lens, batch_size=3)
    finals = []
    for batch in batches:
        xs_b, lens_b = rj.pad_sequences([seqs[i] for i in batch])
        assert xs_b.shape[1] == max(lengths[i] for i in batch)
        finals.append(rj.unroll(cell, params, xs_b, lengths=lens_b, reverse=reverse)[0])
    assert rel_err(rj.unbucket(batches, finals), carry) <= 1e-12
