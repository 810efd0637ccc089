"""One-to-many generation: greedy decoding, sampling, beam search.

Every decoder runs a step function that feeds its own output back::

    state, logits = step_fn(state, tokens)    # tokens int [B] -> logits [B, V]; state: a pytree [B, ...]

for ``max_length`` steps inside one `jax.lax.scan`, so it jits and runs without Python control flow. A
sequence that emits ``end_token`` is finished: from then on it emits ``end_token`` again, and its length
(counting the end token) stops growing. `rnnjax.seq2seq.decoder_step` builds ``step_fn`` from a cell, an
embedding table and a dense read-out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.checks import check_array
from rnnjax.rows import top_k_rows

Array = jax.Array
PyTree = Any
StepFn = Callable[[PyTree, Array], tuple[PyTree, Array]]


class Decoded(NamedTuple):
    """What greedy decoding and sampling return: ``tokens [B, L]`` int (``end_token`` after a sequence
    has finished), ``lengths [B]`` int (up to and including the first end token; L if none) and the step
    function's final ``state``."""

    tokens: Array  # [B, L] int; end_token after a sequence has finished
    lengths: Array  # [B] int: tokens up to and including the first end token (L if none)
    state: PyTree  # the step function's state after the last step


class Beams(NamedTuple):
    """What beam search returns, best beam first: ``tokens [B, K, L]`` int, ``lengths [B, K]`` int,
    ``scores [B, K]`` (``log p / lengths ** length_penalty``) and ``log_probs [B, K]`` (float32)."""

    tokens: Array  # [B, K, L] int
    lengths: Array  # [B, K] int
    scores: Array  # [B, K]: log p(tokens) / lengths ** length_penalty
    log_probs: Array  # [B, K]: log p(tokens), unnormalised


def _check_start(start_tokens: Any, max_length: int) -> Array:
    start_tokens = check_array(start_tokens, "start_tokens", "an integer array [B]")
    if start_tokens.ndim != 1 or not jnp.issubdtype(start_tokens.dtype, jnp.integer):
        raise ValueError(
            f"start_tokens must be an integer array [B], got shape {start_tokens.shape} and dtype "
            f"{start_tokens.dtype}"
        )
    if not (isinstance(max_length, int) and max_length >= 1):
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    return start_tokens


def _check_logits(logits: Array, B: int) -> None:
    if jnp.ndim(logits) != 2 or jnp.shape(logits)[0] != B:
        raise ValueError(
            f"step_fn must return logits of shape [B, V] with B={B}, got shape {jnp.shape(logits)}"
        )


def _autoregress(
    step_fn: StepFn,
    state: PyTree,
    start_tokens: Array,
    max_length: int,
    end_token: int | None,
    choose: Callable[[Array, Array], Array],
    key: Array,
) -> Decoded:
    start_tokens = _check_start(start_tokens, max_length)
    B = start_tokens.shape[0]

    def body(loop: tuple, key_t: Array) -> tuple[tuple, Array]:
        state, tokens, done, lengths = loop
        state, logits = step_fn(state, tokens)
        _check_logits(logits, B)
        new = choose(logits, key_t).astype(start_tokens.dtype)
        if end_token is not None:
            new = jnp.where(done, jnp.asarray(end_token, new.dtype), new)
            lengths = lengths + (~done).astype(lengths.dtype)
            done = done | (new == end_token)
        else:
            lengths = lengths + 1
        return (state, new, done, lengths), new

    # made from start_tokens, so that they are typed as its rows wherever they live (`rnnjax.rows`)
    init = (state, start_tokens, jnp.zeros_like(start_tokens, bool), jnp.zeros_like(start_tokens, jnp.int32))
    (state, _, _, lengths), tokens = jax.lax.scan(body, init, jax.random.split(key, max_length))
    return Decoded(tokens=tokens.T, lengths=lengths, state=state)


def greedy(
    step_fn: StepFn, state: PyTree, start_tokens: Array, max_length: int, *, end_token: int | None = None
) -> Decoded:
    """Greedy decoding: at each step the most likely token, fed back as the next input.

    Args:
      step_fn: ``step_fn(state, tokens [B]) -> (state, logits [B, V])``.
      state: the initial state (e.g. an encoder's final carry), leaves ``[B, ...]``.
      start_tokens: ``[B]`` the first input tokens (e.g. a start-of-sequence id).
      max_length: the number of tokens to generate.
      end_token: the id that finishes a sequence, or None.

    Returns:
      `Decoded` with ``tokens [B, max_length]`` (the dtype of ``start_tokens``), ``lengths [B]`` int32 and
      the final state.

    Raises:
      ValueError: if ``start_tokens`` is not an integer ``[B]`` array, ``max_length`` is not an int >= 1,
        or ``step_fn`` does not return logits ``[B, V]``.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> def step_fn(state, tokens):    # a toy model: the next id, mod 5, is the likeliest
      ...     return state, 4.0 * jax.nn.one_hot((tokens + 1) % 5, 5)
      >>> out = rj.decode.greedy(step_fn, (), jnp.array([0, 2]), max_length=4, end_token=4)
      >>> out.tokens
      Array([[1, 2, 3, 4],
             [3, 4, 4, 4]], dtype=int32)
      >>> out.lengths
      Array([4, 2], dtype=int32)
    """
    return _autoregress(
        step_fn,
        state,
        start_tokens,
        max_length,
        end_token,
        lambda lg, _: jnp.argmax(lg, -1),
        jax.random.key(0),
    )


def sample(
    step_fn: StepFn,
    state: PyTree,
    start_tokens: Array,
    max_length: int,
    key: Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    end_token: int | None = None,
) -> Decoded:
    """Ancestral sampling from ``softmax(logits / temperature)``, optionally from the ``top_k`` tokens only.

    ``temperature -> 0`` approaches greedy decoding; ``temperature > 1`` flattens the distribution.

    Args:
      step_fn, state, start_tokens, max_length, end_token: as `greedy`.
      key: the PRNG key; each step draws with its own split of it.
      temperature: divides the logits (> 0).
      top_k: sample among the ``top_k`` likeliest tokens only (>= 1), or among all (None).

    Returns:
      `Decoded`, as `greedy`.

    Raises:
      ValueError: if ``temperature`` is not > 0 or ``top_k`` is not an int >= 1 or None, and as `greedy`.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> def step_fn(state, tokens):    # a toy model: the next id, mod 5, is the likeliest
      ...     return state, 4.0 * jax.nn.one_hot((tokens + 1) % 5, 5)
      >>> out = rj.decode.sample(step_fn, (), jnp.array([0, 2]), 6, jax.random.key(0), top_k=2)
      >>> out.tokens.shape, out.tokens.dtype, out.lengths
      ((2, 6), dtype('int32'), Array([6, 6], dtype=int32))
    """
    if temperature is None or isinstance(temperature, (str, bytes)):
        raise TypeError(f"temperature must be a number > 0, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 (use rj.decode.greedy for the argmax), got {temperature!r}"
        )
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")

    def choose(logits: Array, key_t: Array) -> Array:
        logits = logits / jnp.asarray(temperature, logits.dtype)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = top_k_rows(logits, top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, jnp.asarray(-jnp.inf, logits.dtype), logits)
        return jax.random.categorical(key_t, logits, axis=-1)

    return _autoregress(step_fn, state, start_tokens, max_length, end_token, choose, key)


def beam_search(
    step_fn: StepFn,
    state: PyTree,
    start_tokens: Array,
    max_length: int,
    *,
    beam_size: int,
    end_token: int | None = None,
    length_penalty: float = 0.0,
) -> Beams:
    """Beam search: keeps the ``beam_size`` most likely prefixes at every step.

    Beams are ranked by their log-probability while searching; finished beams (that emitted ``end_token``)
    stay in the running with their score frozen. At the end the beams are scored by
    ``log p / length ** length_penalty`` (0: plain log-probability; 1: per-token average) and sorted,
    best first. With ``beam_size=1`` this is greedy decoding.

    Args:
      step_fn, state, start_tokens, max_length, end_token: as `greedy`.
      beam_size: K, the number of beams per batch row.
      length_penalty: the exponent α of the length normalisation.

    Returns:
      `Beams` with ``tokens [B, K, L]``, ``lengths [B, K]``, ``scores [B, K]`` and ``log_probs [B, K]``
      (L = ``max_length``; scores and log-probabilities in float32).

    Raises:
      ValueError: if ``beam_size`` is not an int >= 1, and as `greedy`.

    Examples:
      A model that always gives the ids 0, 1, 2 probabilities 0.5, 0.3, 0.2; after ``[0, 0]`` (0.25) come
      ``[0, 1]`` and ``[1, 0]`` (0.15 each, ties to the lower index):

      >>> import jax.numpy as jnp, rnnjax as rj
      >>> def step_fn(state, tokens):    # tokens [B·K]: one row per beam
      ...     return state, jnp.log(jnp.array([0.5, 0.3, 0.2])) + jnp.zeros((tokens.shape[0], 1))
      >>> beams = rj.decode.beam_search(step_fn, (), jnp.array([0]), max_length=2, beam_size=2)
      >>> beams.tokens
      Array([[[0, 0],
              [0, 1]]], dtype=int32)
      >>> [round(float(p), 4) for p in jnp.exp(beams.log_probs[0])]
      [0.25, 0.15]
    """
    start_tokens = _check_start(start_tokens, max_length)
    if not (isinstance(beam_size, int) and beam_size >= 1):
        raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
    B, K = start_tokens.shape[0], beam_size

    # every batch row becomes K rows, b·K + k. Everything below keeps the batch axis apart ([B, K, ...],
    # built by broadcasting from start_tokens and the state), so that with the batch split over devices
    # each device decodes its own rows, and the types stay consistent (`rnnjax.rows`).
    def beams(a: Array) -> Array:  # [B, ...] -> [B·K, ...]
        return jnp.broadcast_to(a[:, None], (B, K, *a.shape[1:])).reshape(B * K, *a.shape[1:])

    state = jax.tree.map(beams, state)
    tokens = beams(start_tokens)

    def body(loop: tuple, t: Array) -> tuple[tuple, None]:
        state, tokens, log_p, done, lengths, seqs = loop
        state, logits = step_fn(state, tokens)
        _check_logits(logits, B * K)
        V = logits.shape[-1]
        step_lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, K, V)
        if end_token is not None:
            # a finished beam has one continuation, end_token again, at no cost
            frozen = jnp.full((V,), -jnp.inf, jnp.float32).at[end_token].set(0.0)
            step_lp = jnp.where(done[..., None], frozen, step_lp)
        cand = (log_p[..., None] + step_lp).reshape(B, K * V)
        log_p, idx = top_k_rows(cand, K)  # [B, K]
        parent, tok = idx // V, (idx % V).astype(tokens.dtype)
        pick = lambda a: jnp.take_along_axis(a, parent, axis=1)  # noqa: E731
        was_done = pick(done)
        lengths = pick(lengths) + (~was_done).astype(jnp.int32)
        done = was_done | (tok == end_token) if end_token is not None else was_done
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, t].set(tok)

        def follow(a: Array) -> Array:  # row b·K + k takes the state of row b·K + parent[b, k]
            a = a.reshape(B, K, *a.shape[1:])
            at = parent.reshape(B, K, *(1,) * (a.ndim - 2))
            return jnp.take_along_axis(a, at, axis=1).reshape(B * K, *a.shape[2:])

        state = jax.tree.map(follow, state)
        return (state, tok.reshape(-1), log_p, done, lengths, seqs), None

    # beam 0 starts alive, the others at -inf so that they are not duplicates
    first = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf).astype(jnp.float32)
    log_p0 = jnp.zeros_like(start_tokens, jnp.float32)[:, None] + first[None, :]
    init = (
        state,
        tokens,
        log_p0,
        jnp.zeros_like(log_p0, bool),
        jnp.zeros_like(log_p0, jnp.int32),
        jnp.broadcast_to(jnp.zeros_like(log_p0, start_tokens.dtype)[..., None], (B, K, max_length)),
    )
    (_, _, log_p, _, lengths, seqs), _ = jax.lax.scan(body, init, jnp.arange(max_length))
    scores = log_p / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    order = jnp.argsort(-scores, axis=1)
    take = lambda a: jnp.take_along_axis(a, order, axis=1)  # noqa: E731
    return Beams(
        tokens=jnp.take_along_axis(seqs, order[..., None], axis=1),
        lengths=take(lengths),
        scores=take(scores),
        log_probs=take(log_p),
    )
