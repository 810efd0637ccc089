"""Data parallelism through JAX's own sharding: a batch-sharded training step on a mesh of two devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a fresh process: the two CPU devices must be requested before JAX starts.
SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import rnnjax as rj

jax.config.update("jax_enable_x64", True)
mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
out = {}
for name in ("lstm", "gru"):
    cell = getattr(rj, name)(8)
    params = cell.init(jax.random.key(0), 5, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (6, 11, 5), jnp.float64)
    lengths = jnp.array([11, 3, 0, 7, 11, 1])

    def loss(p, x, L, grad):
        return jnp.sum(jnp.sin(rj.unroll(cell, p, x, lengths=L, grad=grad)[1]))

    step = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=3)
    sharded = (jax.device_put(params, replicated), jax.device_put(xs, batch), jax.device_put(lengths, batch))
    for grad in ("manual", "autodiff"):
        one = jax.tree.leaves(step(params, xs, lengths, grad))
        value, (d_params, d_xs) = step(*sharded, grad)
        two = jax.tree.leaves((value, (d_params, d_xs)))
        hlo = step.lower(*sharded, grad).compile().as_text()
        out[f"{name}-{grad}"] = {
            "error": max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(two, one)),
            "d_xs_batch_sharded": d_xs.sharding.is_equivalent_to(batch, d_xs.ndim),
            "d_params_replicated": all(g.sharding.is_fully_replicated for g in jax.tree.leaves(d_params)),
            "all_reduces": hlo.count("all-reduce("),
        }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded_steps() -> dict:
    env = dict(
        os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    )
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["lstm-manual", "lstm-autodiff", "gru-manual", "gru-autodiff"])
def test_batch_sharded_step_equals_one_device(case, sharded_steps):
    """Batch sharded over two devices, params replicated: the same loss and gradients, d xs sharded like xs,
    the parameter gradients replicated (summed over the devices by an all-reduce)."""
    r = sharded_steps[case]
    assert r["error"] <= 1e-12, r
    assert r["d_xs_batch_sharded"] and r["d_params_replicated"], r
    assert r["all_reduces"] >= 1, r
