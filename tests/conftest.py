"""Test configuration: float64, exact matmuls, and no silent broadcasting or dtype promotion."""

import os

# The suite compiles several hundred small programs, and LLVM's optimisation of XLA:CPU's kernels took a
# third of its time (11 min 8 s against 6 min 57 s on 2 cores) while buying nothing at test shapes. XLA's
# HLO passes, fusion and buffer assignment, which the memory tests measure, are unchanged by this flag; the
# GEMMs run in precompiled libraries either way. An XLA_FLAGS that sets the level itself wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


# Property tests compile a new program per drawn shape, so they run a modest number of examples and no
# deadline; under CI the draws are derandomized so that a red run can be reproduced exactly.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "rnnjax",
    deadline=None,
    max_examples=12,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("rnnjax")
