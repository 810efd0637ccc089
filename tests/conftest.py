"""Test configuration: float64, exact matmuls, and no silent broadcasting or dtype promotion."""

import os

# The suite compiles several hundred small programs, and LLVM's optimisation of XLA:CPU's kernels, and the
# fusion emitters' code generation, are most of the suite's time while buying nothing at test shapes. XLA's
# HLO passes, fusion and buffer assignment, which the memory tests measure, are unchanged by these flags; the
# GEMMs run in precompiled libraries either way. An XLA_FLAGS that sets a flag itself wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false"
    ).strip()

import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Many tests compile the same programs again (each builds its cells and losses anew): JAX's persistent
# compilation cache, in a directory that lives for this run only, saves those recompilations. Every program
# is cached, however quick to compile.
# Each xdist worker has its own subdirectory: JAX writes an entry without a lock, and a worker reading
# another's half-written entry warned (an error here).
_CACHE_ENV = "RNNJAX_TEST_COMPILATION_CACHE"


def pytest_configure(config: pytest.Config) -> None:
    if _CACHE_ENV not in os.environ:  # the controlling process: xdist's workers inherit the variable
        os.environ[_CACHE_ENV] = config._rnnjax_cache = tempfile.mkdtemp(prefix="rnnjax-xla-cache-")
    own = os.path.join(os.environ[_CACHE_ENV], os.environ.get("PYTEST_XDIST_WORKER", "controller"))
    os.makedirs(own, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", own)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
    if hasattr(config, "_rnnjax_cache"):
        shutil.rmtree(config._rnnjax_cache, ignore_errors=True)


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
