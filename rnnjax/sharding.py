"""The arrays rnnjax creates, typed like the user's when the batch is split over devices.

Three ways to split a batch over a device mesh, and what each asks of the arrays rnnjax makes itself (the
initial carry, the time-padding row, the hand-derived BPTT's row buffers, the decoders' state):
- `jax.sharding.AxisType.Explicit` axes (the default of `jax.make_mesh`, used under `jax.set_mesh`): every
  array's type carries its sharding, ``float32[8@data, 16]``, and operations check it at trace time
  (`jax.lax.scan` needs its carry's sharding unchanged by a step; a concatenation or an in-place row update
  needs equal shardings). Zeros made from a shape alone are replicated, so they take the sharding of the
  rows they meet (`zeros_rows`, `fill_rows`, `shard_batch_like`).
- `jax.sharding.AxisType.Auto` axes: types show no sharding and XLA's partitioner propagates it; these
  functions then do what the plain ones do. Only `under_mesh` looks, to keep the batch axis of the weight
  gradients' contractions apart (`rnnjax.bptt.time_gemm`).
- per device, under `jax.shard_map`: types record the manual axes a value varies over, and a scan's carry
  must keep them; zeros are cast to vary (`vary_like`), and a custom VJP's gradient of a replicated
  parameter is summed over the devices to get its type back (`sum_to_type`).

The mesh is the one in the arrays' types (`jax.sharding.NamedSharding`): every sharding made here names it
(`sharding_on`), so that nothing needs a context mesh (`jax.set_mesh`; arrays placed with `jax.device_put`
under plain `jax.jit` have none), and a mesh of one device is typed, and handled, like any other.

Who imports this module: the drivers only, the code that makes arrays of its own beside the user's and runs
the loops over them (`rnnjax.driver`, `rnnjax.scan`, `rnnjax.bptt`, `rnnjax.remat`, `rnnjax.binomial`,
`rnnjax.tbptt`, `rnnjax.rtrl`, `rnnjax.parallel`, `rnnjax.layers`, `rnnjax.regularize`, `rnnjax.gradcheck`,
`rnnjax.diagnostics`), and `rnnjax.rows`. The cells know nothing of meshes: their ``gates_bwd`` is math on
rows, and what it would sum over the batch or contract over the steps it names (`rnnjax.cells.base.RowSum`,
`rnnjax.cells.base.WeightGemm`) for the BPTT driver to compute where the rows live. The losses and the
decoders say what they need of the rows through `rnnjax.rows` alone. So the one-device path calls no mesh
API, and a change to how meshes are handled is made here and in the drivers, not in each cell.
`tests/test_boundary.py` checks both.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.sharding import NamedSharding, PartitionSpec

Array = jax.Array
PyTree = Any


def _type(like: Any) -> Any:
    """The type of ``like``: an array's or a tracer's abstract value, or ``like`` itself when it is one (a
    `jax.ShapeDtypeStruct` or an abstract value)."""
    return like if isinstance(like, (jax.ShapeDtypeStruct, ShapedArray)) else jax.typeof(like)


def _named(like: Any) -> NamedSharding | None:
    """The sharding in the type of ``like``, if it names a mesh."""
    sharding = _type(like).sharding
    return sharding if isinstance(sharding, NamedSharding) and not sharding.mesh.empty else None


def sharding_on(spec: tuple[Any, ...] | PartitionSpec, *likes: Any) -> NamedSharding | PartitionSpec:
    """``PartitionSpec(*spec)`` on the mesh of the first of ``likes`` that has one: a mesh, or an array, a
    tracer or a shape struct whose type's sharding names one.

    A bare `PartitionSpec` is read against the context mesh (`jax.set_mesh`), and JAX refuses it where there
    is none, as under plain `jax.jit` of arrays placed with `jax.device_put`: their types name the mesh. The
    bare spec is returned only where nothing names a mesh (the context's then applies).
    """
    for like in likes:
        if isinstance(like, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
            return NamedSharding(like, PartitionSpec(*spec))
        if (named := _named(like)) is not None:
            return NamedSharding(named.mesh, PartitionSpec(*spec))
    return PartitionSpec(*spec)


def reshard_to(tree: PyTree, spec: tuple[Any, ...] | PartitionSpec, *likes: Any) -> PyTree:
    """``tree``'s leaves resharded to ``PartitionSpec(*spec)`` on the mesh of the first of ``likes`` or,
    failing those, of the leaf itself (`sharding_on`)."""
    return jax.tree.map(lambda leaf: jax.sharding.reshard(leaf, sharding_on(spec, *likes, leaf)), tree)


def _split(mesh: Any) -> int:
    """How many ways ``mesh`` splits an array: the product of its axes that are not manual (inside
    `jax.shard_map` each device holds its own block and the manual axes split nothing further)."""
    manual = jax.sharding.AxisType.Manual
    return math.prod(n for n, t in zip(mesh.axis_sizes, mesh.axis_types, strict=True) if t != manual)


def varying(like: Any) -> frozenset[str]:
    """The manual mesh axes (inside `jax.shard_map`) over which ``like``'s value varies from device to
    device."""
    manual = getattr(_type(like), "manual_axis_type", None)
    return frozenset() if manual is None else frozenset(manual.varying)


def vary_like(tree: PyTree, *others: PyTree) -> PyTree:
    """``tree``'s leaves cast to vary over every manual axis that a leaf of ``others`` varies over.

    Inside `jax.shard_map` a value computed from device-varying inputs varies too, and `jax.lax.scan` needs
    its carry to keep its type: zeros (the same on every device) entering a step that reads a varying
    ``xs`` must be declared varying first (`jax.lax.pcast`).
    """
    axes = frozenset().union(*(varying(leaf) for leaf in jax.tree.leaves(others)))
    if not axes:
        return tree

    def cast(leaf: Any) -> Any:
        missing = tuple(sorted(axes - varying(leaf)))
        return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


def explicit_spec(like: Any) -> tuple[Any, ...] | None:
    """The partition spec in the type of ``like``, one entry per axis, or None when no axis is sharded
    explicitly."""
    sharding = _named(like)
    if sharding is None:
        return None
    spec = tuple(sharding.spec) + (None,) * (len(like.shape) - len(sharding.spec))
    return spec if any(a is not None for a in spec) else None


def fill_rows(value: Array, like: Any, rows: tuple[int, ...] = ()) -> Array:
    """The scalar ``value`` broadcast to ``[*rows, *like.shape]`` in ``like``'s dtype (an array, a tracer
    or a shape struct), typed like ``like`` on its axes (sharding, manual axes it varies over), the new
    leading ``rows`` axes replicated: e.g. a ``[T+1, B, G]`` buffer of ``[B, G]`` rows."""
    spec = explicit_spec(like)
    sharding = None if spec is None else sharding_on((*(None,) * len(rows), *spec), like)
    value = jnp.asarray(value).astype(like.dtype)
    return vary_like(jnp.broadcast_to(value, (*rows, *like.shape), out_sharding=sharding), like)


def zeros_rows(like: Any, rows: tuple[int, ...] = ()) -> Array:
    """`fill_rows` of zeros."""
    return fill_rows(jnp.zeros((), like.dtype), like, rows)


def batch_split(like: Any) -> tuple[Any, PartitionSpec] | None:
    """``(mesh, P(batch axes))`` where the leading (batch) axis of ``like`` is split over an explicit mesh,
    else None: what `jax.shard_map` needs to run a per-sequence computation on each device's own rows."""
    spec = explicit_spec(like)
    named = _named(like)
    if spec is None or spec[0] is None or named is None:  # (a spec comes from a named sharding)
        return None
    return named.mesh, PartitionSpec(spec[0])


def shard_batch_like(tree: PyTree, xs: Array, n_batch: int) -> PyTree:
    """``tree``'s leaves (``[*batch, ...]``, e.g. a carry) resharded so that their ``n_batch`` leading axes
    are sharded as those of ``xs`` are, their other axes replicated. Nothing changes when ``xs``'s batch
    axes carry no explicit sharding."""
    spec = explicit_spec(xs)
    if spec is None or all(a is None for a in spec[:n_batch]):
        return tree

    def reshard(leaf: Array) -> Array:
        want = (*spec[:n_batch], *(None,) * (leaf.ndim - n_batch))
        return leaf if explicit_spec(leaf) == want else reshard_to(leaf, want, xs)

    return jax.tree.map(reshard, tree)


def reshard_like(tree: PyTree, types: PyTree) -> PyTree:
    """``tree``'s leaves resharded to the explicit shardings of the matching leaves of ``types`` (arrays or
    shape structs, e.g. what one step of a loop gives back) where those differ: a loop's carry must enter
    typed as it leaves."""

    def reshard(leaf: Array, like: Any) -> Array:
        want = explicit_spec(like)
        if want == explicit_spec(leaf):
            return leaf
        return reshard_to(leaf, want or (), like)

    return jax.tree.map(reshard, tree, types)


def batch_like(tree: PyTree, xs: Array, n_batch: int, *others: PyTree) -> PyTree:
    """``tree``'s leaves (``[*batch, ...]``: a carry, a state the library makes from shapes) typed as rows of
    ``xs``: their ``n_batch`` leading axes sharded as those of ``xs`` (`shard_batch_like`), and varying
    over every manual axis that ``xs`` or a leaf of ``others`` varies over (`vary_like`)."""
    return vary_like(shard_batch_like(tree, xs, n_batch), xs, *others)


def first_element(a: Array) -> Array:
    """A scalar that depends on ``a``: its first element, or, where axes of ``a`` are sharded explicitly,
    the sum of their first elements across the shards (a scalar all-reduce: a sharded axis cannot be
    indexed at one position without a collective)."""
    spec = explicit_spec(a) or (None,) * a.ndim
    return jnp.sum(a[tuple(slice(None) if s is not None else 0 for s in spec)])


def under_mesh(*arrays: Any) -> bool:
    """Whether the computation may be split over devices: a context mesh of more than one device
    (`jax.set_mesh`), any of ``arrays`` typed on one, or any of them split explicitly, over however many
    devices (a mesh of one device types an array as split, ``float32[8@data, 16]``, and JAX then refuses
    what it refuses on more: a reshape that merges the split axis with another). Under `jax.jit`, arrays
    placed on a mesh (even with `~jax.sharding.AxisType.Auto` axes, whose types show no sharding) give
    their mesh to every value computed from them, so the backward of a custom VJP sees it too."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and _split(mesh) > 1:
        return True
    return any(
        (s := _named(a)) is not None and (_split(s.mesh) > 1 or explicit_spec(a) is not None) for a in arrays
    )


def replicated_if_explicit(*arrays: Any) -> NamedSharding | PartitionSpec | None:
    """The ``out_sharding`` of a contraction over the batch (a weight gradient) of ``arrays``: replicated
    where an operand is sharded explicitly, whose contracted axes leave the result's sharding ambiguous;
    else None, the default."""
    explicit = [a for a in arrays if explicit_spec(a) is not None]
    return sharding_on((), *explicit) if explicit else None


def sum_to_type(cotangents: PyTree, primals: PyTree) -> PyTree:
    """Each cotangent summed over the devices of every manual axis it varies over and its primal does not
    (``jax.lax.psum``), so that it has its primal's type, as a custom VJP must return.

    Inside `jax.shard_map` a replicated parameter meets each device's own rows: its gradient from those rows
    varies by device, and its whole gradient is their sum. (JAX's autodiff does the same: the transpose of
    the implicit cast of an invariant value to a varying one is a ``psum``.) Summed here once, after the
    whole backward, not once per step.
    """

    def reduce(ct: Any, primal: Any) -> Any:
        extra = tuple(sorted(varying(ct) - varying(primal)))
        return jax.lax.psum(ct, extra) if extra else ct

    return jax.tree.map(reduce, cotangents, primals)


def row_groups(xs: Any) -> int:
    """How many groups to cut the rows of ``xs [B, ...]`` into so that each device's rows can form one, on a
    mesh of `~jax.sharding.AxisType.Auto` axes (whose types do not say how the batch is split): every device
    of those axes of the mesh that ``xs``'s type names. 1 where no such mesh is named, on explicit axes
    (their types name the split: run per device under `jax.shard_map` there), or where B is not a multiple
    of the count."""
    named = _named(xs)
    if named is None or xs.ndim == 0 or explicit_spec(xs) is not None:
        return 1
    auto = jax.sharding.AxisType.Auto
    mesh = named.mesh
    groups = math.prod(n for n, t in zip(mesh.axis_sizes, mesh.axis_types, strict=True) if t == auto)
    return groups if groups > 1 and xs.shape[0] % groups == 0 else 1


def split_rows(tree: PyTree, groups: int, axis: int = 0) -> PyTree:
    """``tree``'s leaves with their batch axis ``axis`` (``B``) cut into ``groups`` groups of consecutive
    rows, the group axis first: ``[..., B, ...] -> [groups, ..., B / groups, ...]``. A batch split over
    devices in blocks of consecutive rows stays split by the group axis, one group per device."""

    def split(leaf: Array) -> Array:
        shape = leaf.shape
        cut = leaf.reshape(*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])
        return jnp.moveaxis(cut, axis, 0)

    return jax.tree.map(split, tree)


def merge_rows(tree: PyTree, axis: int = 0) -> PyTree:
    """The inverse of `split_rows`: ``[groups, ..., B / groups, ...] -> [..., B, ...]``."""

    def merge(leaf: Array) -> Array:
        moved = jnp.moveaxis(leaf, 0, axis)
        return moved.reshape(*moved.shape[:axis], -1, *moved.shape[axis + 2 :])

    return jax.tree.map(merge, tree)
