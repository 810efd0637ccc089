"""The release artefacts: ``python -m build`` makes an sdist and a wheel from it, and the wheel installs and runs.

These tests build, unpack and install, so they run from ``make test-dist`` (which sets ``RNNJAX_TEST_DIST``)
rather than in every ``pytest`` run.
"""

from __future__ import annotations

import email
import os
import pathlib
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile

import pytest

import rnnjax as rj

ROOT = pathlib.Path(__file__).parents[1]

pytestmark = pytest.mark.skipif(
    not os.environ.get("RNNJAX_TEST_DIST"), reason="builds and installs the wheel: run by `make test-dist`"
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """The sdist and the wheel, built as a release is: the wheel from the unpacked sdist.

    The build runs on a copy of the working tree without build leftovers (a stale ``*.egg-info`` would
    lend the sdist its old file list), and ``--no-isolation`` builds with this environment's setuptools, so
    no download is needed."""
    src = tmp_path_factory.mktemp("src") / "rnnjax"
    leftovers = (
        ".git",
        ".venv*",
        "*.egg-info",
        "build",
        "dist",
        "runs",
        "__pycache__",
        ".*_cache",
        ".hypothesis",
    )
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*leftovers))
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (sdist,) = out.glob("rnnjax-*.tar.gz")
    (wheel,) = out.glob("rnnjax-*.whl")
    return sdist, wheel


def test_sdist_holds_the_tests_examples_and_licence(dist):
    sdist, _ = dist
    prefix = f"rnnjax-{rj.__version__}/"
    with tarfile.open(sdist) as tar:
        names = {n.removeprefix(prefix) for n in tar.getnames()}
    expected = {
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "rnnjax/__init__.py",
        "rnnjax/py.typed",
        "tests/conftest.py",
        "tests/helpers.py",
        "tests/test_unroll.py",
        "examples/__init__.py",
        "examples/char_lm.py",
        "benchmarks/rnn_step.py",
    }
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_holds_py_typed_licence_and_version(dist):
    _, wheel = dist
    info = f"rnnjax-{rj.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = email.message_from_bytes(whl.read(f"{info}/METADATA"))
    assert {"rnnjax/py.typed", "rnnjax/cells/__init__.py", f"{info}/licenses/LICENSE"} <= names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    assert metadata["Version"] == rj.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    runtime = [r.split(">")[0] for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(runtime) == ["flax", "jax", "optax"]  # chex, matplotlib: extras only


def test_wheel_installs_into_a_fresh_venv_and_runs(dist, tmp_path):
    """The wheel alone (``--no-deps``, no index) in a new venv that sees this environment's packages (jax, flax,
    optax) through a ``.pth`` file, run from a folder outside the repository: rnnjax comes from the wheel."""
    _, wheel = dist
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # path lines, appended after the venv's own site-packages: the wheel's rnnjax is found first
    pathlib.Path(purelib, "parent-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = (
        "import pathlib, jax, rnnjax as rj\n"
        "cell = rj.gru(4)\n"
        "params = cell.init(jax.random.key(0), input_size=3)\n"
        "xs = jax.random.normal(jax.random.key(1), (2, 5, 3))\n"
        "carry, ys = rj.unroll(cell, params, xs, lengths=jax.numpy.array([5, 2]))\n"
        "assert ys.shape == (2, 5, 4), ys.shape\n"
        "here = pathlib.Path(rj.__file__).parent\n"
        "print(here, (here / 'py.typed').exists(), rj.__version__)\n"
    )
    run = subprocess.run(
        [str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    where, typed, version = run.stdout.split()
    assert pathlib.Path(where).is_relative_to(venv), where
    assert typed == "True" and version == rj.__version__
