"""Test configuration: float64, exact matmuls, and no silent broadcasting or dtype promotion."""

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
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "rnnjax",
    deadline=None,
    max_examples=12,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("rnnjax")
