"""Encoder-decoder: teacher forcing trained through both hand-derived BPTTs, and decoding from the encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj

B, S, T, I, H, V, E = 3, 6, 4, 3, 5, 7, 4
START = 0


def model(key):
    k = jax.random.split(key, 4)
    enc, dec, head = rj.lstm(H), rj.lstm(H), rj.dense(V)
    params = {
        "enc": enc.init(k[0], I, jnp.float64),
        "dec": dec.init(k[1], E, jnp.float64),
        "embed": jax.random.normal(k[2], (V, E), jnp.float64),
        "head": head.init(k[3], H, jnp.float64),
    }
    return enc, dec, head, params


def test_shift_right():
    np.testing.assert_array_equal(rj.seq2seq.shift_right(jnp.array([[4, 5, 6]]), 9), [[9, 4, 5]])


def test_teacher_forcing_gradients(key):
    enc, dec, head, params = model(key)
    xs = jax.random.normal(jax.random.key(1), (B, S, I), jnp.float64)
    targets = jax.random.randint(jax.random.key(2), (B, T), 1, V)
    src_lengths, tgt_lengths = jnp.array([6, 3, 1]), jnp.array([4, 2, 3])

    def loss(params, xs, grad="manual"):
        enc_carry, _ = rj.unroll(enc, params["enc"], xs, lengths=src_lengths, grad=grad)
        dec_in = params["embed"][rj.seq2seq.shift_right(targets, START)]
        _, hs = rj.unroll(dec, params["dec"], dec_in, enc_carry, lengths=tgt_lengths, grad=grad)
        return rj.losses.sequence_cross_entropy(head.apply(params["head"], hs), targets, tgt_lengths)

    report = rj.gradcheck(loss, params, xs)
    assert report.passed, str(report)
    # the decoder's loss reaches the encoder, through its final carry
    g = jax.grad(loss)(params, xs)
    assert float(jnp.max(jnp.abs(g["enc"].w_ih))) > 0


def test_decoder_step_agrees_with_teacher_forcing(key):
    """Greedy decoding's logits equal the teacher-forced decoder's logits when fed the greedy tokens."""
    enc, dec, head, params = model(key)
    xs = jax.random.normal(jax.random.key(1), (B, S, I), jnp.float64)
    enc_carry, _ = rj.unroll(enc, params["enc"], xs)
    step = rj.seq2seq.decoder_step(dec, params["dec"], params["embed"], params["head"])
    out = rj.decode.greedy(step, enc_carry, jnp.full((B,), START), T)
    dec_in = params["embed"][rj.seq2seq.shift_right(out.tokens, START)]
    _, hs = rj.unroll(dec, params["dec"], dec_in, enc_carry)
    np.testing.assert_array_equal(jnp.argmax(head.apply(params["head"], hs), -1), out.tokens)
    beams = rj.decode.beam_search(step, enc_carry, jnp.full((B,), START), T, beam_size=3)
    assert beams.tokens.shape == (B, 3, T)
    assert bool(jnp.all(beams.log_probs[:, 0] >= beams.log_probs[:, 1]))
