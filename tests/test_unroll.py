"""Forward semantics of rj.unroll against a hand-written numpy loop, and its properties under JAX."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, compilations, jit_grad, random_problem, rel_err, tiered
from reference_cells import REFERENCES

import rnnjax as rj

B, T, I, H = 4, 7, 3, 5


def numpy_unroll(name, params, xs, carry, lengths, reverse):
    """The cells' equations in plain numpy (`reference_cells`), one sequence and one step at a time."""
    step = REFERENCES[name].step
    p = {k: np.asarray(v) for k, v in params._asdict().items()}
    xs = np.asarray(xs)
    h_all = np.asarray(carry.h).copy()
    c_all = np.asarray(carry.c).copy() if hasattr(carry, "c") else None
    ys = np.zeros((xs.shape[0], xs.shape[1], h_all.shape[-1]))
    for b in range(xs.shape[0]):
        n = xs.shape[1] if lengths is None else int(lengths[b])
        order = range(n - 1, -1, -1) if reverse else range(n)
        h = h_all[b]
        c = c_all[b] if c_all is not None else None
        for t in order:
            h, c = step(p, xs[b, t], h, c)
            ys[b, t] = h
        h_all[b] = h
        if c_all is not None:
            c_all[b] = c
    return h_all, c_all, ys


LENGTHS = np.array([7, 0, 3, 1])
# the core's three cells in all four corners, the others full-forward and lengths-reverse
REFERENCE_CASES = [
    pytest.param(name, lengths, reverse, id=f"{name}-{'lengths' if lengths is not None else 'full'}-{d}")
    for name in CELLS
    for lengths, reverse, d in (
        (None, False, "forward"),
        (None, True, "reverse"),
        (LENGTHS, False, "forward"),
        (LENGTHS, True, "reverse"),
    )
    if name in ("elman-tanh", "lstm", "gru") or (lengths is None) != reverse
]


@pytest.mark.parametrize(("name", "lengths", "reverse"), REFERENCE_CASES)
def test_matches_numpy_reference(name, lengths, reverse, key):
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    final, ys = rj.unroll(
        cell, params, xs, carry, lengths=None if lengths is None else jnp.asarray(lengths), reverse=reverse
    )
    h, c, ys_ref = numpy_unroll(name, params, xs, carry, lengths, reverse)
    assert rel_err(ys, ys_ref) <= 1e-13
    assert rel_err(final.h, h) <= 1e-13
    if c is not None:
        assert rel_err(final.c, c) <= 1e-13


@pytest.mark.parametrize("name", tiered(list(CELLS)))
def test_step_loop_twin(name, key):
    """The hoisted scan equals a plain Python loop over cell.step, in values and (via jax.grad) gradients."""
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)

    def loop(params, xs, carry):
        ys = []
        for t in range(T):
            carry, y = cell.step(params, carry, xs[:, t])
            ys.append(y)
        return jnp.sum(jnp.sin(jnp.stack(ys, 1))) + jnp.sum(jnp.cos(carry.h))

    def scanned(params, xs, carry):
        final, ys = rj.unroll(cell, params, xs, carry)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(jnp.cos(final.h))

    assert abs(float(loop(params, xs, carry) - scanned(params, xs, carry))) <= 1e-12
    assert (
        rel_err(jax.grad(scanned, (0, 1, 2))(params, xs, carry), jax.grad(loop, (0, 1, 2))(params, xs, carry))
        <= 1e-10
    )


def test_lengths_semantics(key):
    cell = rj.gru(H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    lengths = jnp.array([7, 0, 3, 1])
    for reverse in (False, True):
        final, ys = rj.unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)
        # outputs past each length are zero
        for b, n in enumerate([7, 0, 3, 1]):
            assert np.all(np.asarray(ys[b, n:]) == 0)
        # an empty sequence keeps its initial carry
        np.testing.assert_array_equal(final.h[1], carry.h[1])
        # a sequence equals the same sequence cut to its length, run alone
        f3, y3 = rj.unroll(cell, params, xs[2:3, :3], jax.tree.map(lambda a: a[2:3], carry), reverse=reverse)
        np.testing.assert_allclose(ys[2, :3], y3[0], rtol=1e-14)
        np.testing.assert_allclose(final.h[2], f3.h[0], rtol=1e-14)
    # full lengths are the same as no lengths
    np.testing.assert_array_equal(
        rj.unroll(cell, params, xs, lengths=jnp.full((B,), T))[1], rj.unroll(cell, params, xs)[1]
    )


def test_reverse_is_flip(key):
    """Without lengths, reverse equals running on time-flipped inputs and flipping the outputs back."""
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    f_rev, ys_rev = rj.unroll(cell, params, xs, carry, reverse=True)
    f_flip, ys_flip = rj.unroll(cell, params, xs[:, ::-1], carry)
    np.testing.assert_allclose(ys_rev, ys_flip[:, ::-1], rtol=1e-14)
    np.testing.assert_allclose(f_rev.c, f_flip.c, rtol=1e-14)


@pytest.mark.parametrize("grad", rj.GRAD_MODES)
def test_zero_length_sequence(grad, key):
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    final, ys = rj.unroll(cell, params, xs[:, :0], carry, grad=grad)
    assert ys.shape == (B, 0, H)
    np.testing.assert_array_equal(final.c, carry.c)
    g = jax.grad(lambda c: jnp.sum(rj.unroll(cell, params, xs[:, :0], c, grad=grad)[0].h))(carry)
    np.testing.assert_array_equal(g.h, np.ones((B, H)))


@pytest.mark.parametrize("name", ["lstm", "gru", "elman-tanh"])
def test_empty_batch(name, key):
    """A batch of 0 sequences: outputs of shape [0, T, H] and zero gradients, in both modes."""
    cell = CELLS[name](H)
    params, xs, _ = random_problem(cell, key, 1, T, I)
    for grad in rj.GRAD_MODES:
        _, ys = rj.unroll(cell, params, xs[:0], grad=grad)
        assert ys.shape == (0, T, H)
        g = jax.grad(lambda p, g=grad: jnp.sum(rj.unroll(cell, p, xs[:0], grad=g)[1] ** 2))(params)
        assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(g))


def test_initial_carry_defaults_to_zeros(key):
    cell = rj.lstm(H)
    params, xs, _ = random_problem(cell, key, B, T, I)
    zeros = cell.initial_carry(params, batch_shape=(B,))
    assert zeros.h.shape == (B, H) and float(jnp.abs(zeros.c).max()) == 0
    np.testing.assert_array_equal(rj.unroll(cell, params, xs)[1], rj.unroll(cell, params, xs, zeros)[1])


@pytest.mark.parametrize("unroll", [1, 3, True])
def test_unroll_factor_changes_nothing(unroll, key):
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, key, B, T, I)

    def loss(p, u):
        return jnp.sum(rj.unroll(cell, p, xs, carry, lengths=jnp.array([7, 0, 3, 1]), unroll_steps=u)[1] ** 2)

    assert rel_err(jax.grad(loss)(params, unroll), jax.grad(loss)(params, 1)) <= 1e-13


def _unroll_factors(fn, *args):
    return re.findall(r"\bunroll=(\w+)", str(jax.make_jaxpr(fn)(*args)))


@pytest.mark.parametrize("name", ["lstm", "gru", "elman-tanh"])
def test_default_unroll_is_one_for_every_loop(name, key):
    """``unroll=None``: the hand-derived BPTT's undifferentiated forward and every loop of a gradient (and
    of the autodiff twin) run at 1; an int is passed through."""
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    lengths = jnp.array([7, 0, 3, 1])

    def ys(p, **kw):
        return rj.unroll(cell, p, xs, carry, lengths=lengths, **kw)[1]

    assert _unroll_factors(ys, params) == ["1"]
    assert _unroll_factors(lambda p: ys(p, unroll_steps=4), params) == ["4"]
    assert rel_err(ys(params), ys(params, unroll_steps=4)) <= 1e-14
    assert set(_unroll_factors(jax.grad(lambda p: jnp.sum(ys(p) ** 2)), params)) == {"1"}
    assert set(_unroll_factors(lambda p: ys(p, grad="autodiff"), params)) == {"1"}
    assert set(_unroll_factors(lambda p: ys(p, checkpoint=2), params)) == {"1"}
    assert set(_unroll_factors(lambda p: ys(p, unroll_steps=2), params)) == {"2"}


def test_compiles_once_per_shape(key):
    cell = rj.lstm(H)
    params, xs, _carry = random_problem(cell, key, B, T, I)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, xs, lengths):
        return jax.value_and_grad(lambda p: jnp.sum(rj.unroll(cell, p, xs, lengths=lengths)[1] ** 2))(params)

    chex.clear_trace_counter()
    for i in range(3):
        train_step(params, xs * (i + 1), jnp.array([7, i, 3, 1]))


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_eager_calls_compile_one_program_not_one_per_operation(grad, caplog):
    """Called eagerly, `rj.unroll` is one compiled program, and an eager `jax.grad` through it one forward and
    one backward program. Dispatched operation by operation, the LSTM's took 10-11 and 17-64 compilations."""
    cell = rj.lstm(7)  # shapes that no other test uses, so that nothing is cached from them
    params, xs, _ = random_problem(cell, jax.random.key(3), 3, 13, 5)
    lengths = jnp.array([13, 4, 0])

    ys = lambda p, x: rj.unroll(cell, p, x, lengths=lengths, grad=grad)[1]  # noqa: E731
    assert len(compilations(caplog, ys, params, xs)) <= 2  # with the zero initial carry
    done = compilations(caplog, jax.grad(lambda p, x: jnp.sum(ys(p, x)), (0, 1)), params, xs)
    assert len(done) <= 5, done


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", tiered(["elman-tanh", "lstm", "gru"], fast=("lstm",)))
def test_low_precision_runs_and_stays_finite(name, dtype, key):
    cell = CELLS[name](16)
    params, xs, _ = random_problem(cell, key, 8, 20, 6, dtype)
    assert params.w_ih.dtype == dtype
    final, ys = rj.unroll(cell, params, xs, lengths=jnp.arange(8) * 2)
    assert ys.dtype == dtype and final.h.dtype == dtype
    g = jit_grad(lambda p: jnp.sum(rj.unroll(cell, p, xs)[1].astype(jnp.float32) ** 2))(params)
    assert all(leaf.dtype == dtype and bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    # and close to the float64 answer
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    ys64 = rj.unroll(cell, p64, xs.astype(jnp.float64), lengths=jnp.arange(8) * 2)[1]
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    assert rel_err(ys.astype(jnp.float64), ys64) <= tol


def test_hessian_through_manual_equals_autodiff(key):
    """Forward-over-reverse differentiates the hand-derived backward; the Hessian equals autodiff's."""
    cell = rj.gru(3)
    params, xs, carry = random_problem(cell, key, 2, 4, 2)
    f = lambda x, g: jnp.sum(jnp.sin(rj.unroll(cell, params, x, carry, lengths=jnp.array([4, 2]), grad=g)[1]))  # noqa: E731
    assert rel_err(jax.hessian(f)(xs, "manual"), jax.hessian(f)(xs, "autodiff")) <= 1e-10


def test_forward_mode_through_autodiff(key):
    """grad="autodiff" supports jax.jvp and jax.hessian; they agree with reverse mode."""
    cell = rj.gru(3)
    params, xs, carry = random_problem(cell, key, 2, 4, 2)
    f = lambda x: jnp.sum(rj.unroll(cell, params, x, carry, grad="autodiff")[1] ** 2)  # noqa: E731
    _, tangent = jax.jvp(f, (xs,), (jnp.ones_like(xs),))
    np.testing.assert_allclose(tangent, jnp.sum(jax.grad(f)(xs)), rtol=1e-12)
    assert jax.hessian(f)(xs).shape == (2, 4, 2, 2, 4, 2)


def test_init_options(key):
    p = rj.lstm(4, forget_bias=1.0).init(key, 3)
    p0 = rj.lstm(4).init(key, 3)
    np.testing.assert_allclose(p.b[4:8] - p0.b[4:8], np.ones(4), rtol=1e-6)
    np.testing.assert_array_equal(p.b[:4], p0.b[:4])
    ones = lambda key, shape, dtype: jnp.ones(shape, dtype)  # noqa: E731
    p = rj.gru(4, w_ih_init=ones, w_hh_init=ones, b_init=ones).init(key, 3, jnp.float64)
    assert p.w_ih.dtype == jnp.float64 and float(p.w_hh.min()) == 1 and float(p.b_hn.min()) == 1
    assert jax.tree.map(jnp.shape, rj.elman(4).init(key, 3)) == rj.ElmanParams((3, 4), (4, 4), (4,))
    assert rj.elman(4).init(key, 3).w_ih.dtype == jnp.float64  # JAX's default float dtype (x64 here)


def test_lru_with_a_dense_read_out_is_the_papers_layer(key):
    """Orvieto et al.'s y_t = Re(C s_t) + D ⊙ x_t, in complex numpy, equals rj.lru + rj.dense + the skip."""
    N, O, I_ = 3, 4, 4  # the skip D ⊙ x_t keeps the width: O = I
    cell = rj.lru(N, r_min=0.5, r_max=0.99)
    params = cell.init(key, I_, jnp.float64)  # at init: b = 0 (the paper has none), γ its normalisation
    xs = jax.random.normal(jax.random.fold_in(key, 1), (2, 6, I_), jnp.float64)
    rng = np.random.default_rng(0)
    C = rng.normal(size=(O, N)) + 1j * rng.normal(size=(O, N))
    D = rng.normal(size=(I_,))
    # the paper's layer, one sequence at a time, s_0 = 0
    p = {k: np.asarray(v) for k, v in params._asdict().items()}
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    B_ = (p["w_ih"][:, :N] + 1j * p["w_ih"][:, N:]).T  # [N, I]
    expected = np.zeros((2, 6, O))
    for b in range(2):
        s = np.zeros(N, complex)
        for t in range(6):
            u = np.asarray(xs[b, t])
            s = lam * s + np.exp(p["gamma_log"]) * (B_ @ u)
            expected[b, t] = (C @ s).real + D * u
    # rnnjax: the cell, a dense read-out without bias over [Re s, Im s], and the skip
    head = rj.dense(O)
    head_params = rj.DenseParams(w=jnp.asarray(np.concatenate([C.real.T, -C.imag.T])), b=jnp.zeros(O))
    _, hs = rj.unroll(cell, params, xs)
    ours = head.apply(head_params, hs) + xs * jnp.asarray(D)[None, None]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-13)
    # every eigenvalue inside the ring it was drawn from, and γ the paper's normalisation at init
    assert np.all((np.abs(lam) >= 0.5) & (np.abs(lam) < 0.99))
    np.testing.assert_allclose(np.exp(p["gamma_log"]), np.sqrt(1 - np.abs(lam) ** 2), rtol=1e-12)


@pytest.mark.parametrize(
    ("name", "unroll"),
    [("lstm", 1), ("lstm", 2), ("lstm", 3), ("lstm", True), ("gru", 1)]
    + [
        pytest.param(name, unroll, marks=pytest.mark.slow)
        for name, unroll in (
            ("minlstm", 1),
            ("minlstm", 2),
            ("mingru", 1),
            ("lstm-peephole", 1),
            ("lstm-layernorm", 1),
            ("lstm-projected", 1),
        )
    ],
)
def test_shared_buffer_is_never_copied_in_a_loop(name, unroll, key):
    """The buffer that holds zx, then the residuals, then dzx (`rnnjax.scan.residual_slot`) is updated in
    place at every unroll factor: no loop of the compiled training step copies a ``[T+1, B, G]`` array.
    (It is shared only at unroll 1: unrolled, a step's late write and the next step's read met in one
    iteration, and XLA copied the whole buffer in every iteration, 5x the time. The layer-norm LSTM's
    readers of the row copied it too, until the row was read once behind an optimization barrier: that
    showed at B=8, T=16, not at 4 x 7.)"""
    B, T, I, H = 8, 16, 16, 16
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    G = params.w_ih.shape[-1]
    lengths = jnp.array([T, 0, 3, 1, T - 2, T, 5, T])

    def loss(p, x):
        return jnp.sum(rj.unroll(cell, p, x, carry, lengths=lengths, unroll_steps=unroll)[1] ** 2)

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(params, xs).compile().as_text()
    computation, copies = None, []
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            computation = line.split(" ")[0]  # "ENTRY" for the top level, else a loop body or a fusion
        elif computation != "ENTRY" and re.search(rf"= f64\[{T + 1},{B},{G}\]\S* copy\(", line):
            copies.append((computation, line.strip()[:100]))
    assert not copies, copies


@pytest.mark.parametrize(("T_", "shared"), [(3, False), (15, True)])
def test_shared_buffer_only_over_enough_rows(T_, shared):
    """The projection's buffer holds the residuals only when it has at least as many rows (T + 1 times B)
    as the weights (I + H): below that, the backward's one-row corrections of the weight gradients (an
    [I, G] and an [H, G] temporary) cost more than the sharing saves, as on the short segments of
    ``checkpoint=3`` or the nested budget schedule. LSTM, B=4, I=H=32: 64 rows of weights."""
    from rnnjax.scan import pad_time, scan_gates_saving

    cell = rj.lstm(32)
    params = cell.init(jax.random.key(0), 32)
    xs_rows = pad_time(jnp.ones((T_, 4, 32), params.w_ih.dtype), False)
    *_, last = scan_gates_saving(
        cell, params, xs_rows @ params.w_ih, cell.initial_carry(params, (4,)), None, False, 1
    )
    assert (last is not None) == shared


def _reads_row(ops: dict, v: str, memo: dict) -> bool:
    """Whether value ``v`` of a computation (``ops``: name -> (opcode, operands, attributes)) is computed
    from a `dynamic-slice` in it."""
    if v not in memo:
        op, args, _ = ops.get(v, ("parameter", [], ""))
        memo[v] = op == "dynamic-slice" or any(_reads_row(ops, a, memo) for a in args)
    return memo[v]


def _sliced_reads(hlo: str) -> list[tuple[str, str]]:
    """The kernels (fused computations) of a compiled HLO module that slice, two or more different ways,
    one value computed from a `dynamic-slice` inside the same kernel: ``(computation, value)`` pairs."""
    found = []
    for block in re.split(r"\n(?=\S)", hlo):
        name = block.split(" ", 1)[0]
        ops: dict[str, tuple[str, list[str], str]] = {}
        for line in block.splitlines()[1:]:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (?:\([^)]*\)|\S+) ([\w\-]+)\(([^)]*)\)(.*)", line)
            if m:
                ops[m[1]] = (m[2], re.findall(r"%([\w.\-]+)", m[3]), m[4])
        slices: dict[str, set[str]] = {}
        for op, args, attrs in ops.values():
            if op == "slice":
                slices.setdefault(args[0], set()).add(re.search(r"slice=\{[^}]*\}", attrs)[0])
        memo: dict[str, bool] = {}
        found += [(name, v) for v, specs in slices.items() if len(specs) > 1 and _reads_row(ops, v, memo)]
    return found


@pytest.mark.parametrize("name", tiered(sorted(CELLS)))
def test_no_kernel_slices_a_row_it_reads_several_ways(name, key):
    """No kernel of the forward or of the training step reads a row of a stacked buffer and slices it by
    several column blocks: XLA:CPU runs such a kernel unvectorized, 4-8x slower (the LSTM's backward loop
    spent 120 of its 290 µs per step in it, the GRU's forward 100 of 200). The rows are read by gate blocks
    instead (`rnnjax.scan.read_row`), each block's slice folded into its own read."""
    B, T, I, H = 8, 16, 16, 16
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    lengths = jnp.array([T, 0, 3, 1, T - 2, T, 5, T])

    def ys(p, x):
        return rj.unroll(cell, p, x, carry, lengths=lengths)[1]

    forward = jax.jit(ys).lower(params, xs).compile().as_text()
    step = (
        jax.jit(jax.grad(lambda p, x: jnp.sum(ys(p, x) ** 2), (0, 1))).lower(params, xs).compile().as_text()
    )
    assert not _sliced_reads(forward)
    assert not _sliced_reads(step)
