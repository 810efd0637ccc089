"""The gradient-check table: the hand-derived BPTT against three independent oracles and finite differences.

For every built-in cell (Elman with each activation, LSTM, GRU and the seven others), with and without
variable lengths, forward and reverse, `rj.gradcheck` compares the hand-derived BPTT in float64 with:
  - `jax.grad` (reverse mode) through the same forward scan (relative error, round-off ~1e-16);
  - RTRL: forward mode (`jax.jacfwd`) through the scan, sensitivities carried forward in time (~1e-16);
  - the complex-step derivative Im L(θ + ihv)/h, h = 1e-20, along random directions (~1e-16);
  - central finite differences at the optimal step along random directions (~1e-10).

Run:  python -m examples.gradcheck_table [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if not __package__:  # run as a file (python examples/x.py): import rnnjax and examples from this clone
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

import rnnjax as rj


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 4
    time: int = 12
    input_size: int = 5
    hidden_size: int = 6
    n_directions: int = 3
    seed: int = 0


def cells(hidden_size: int) -> list[rj.Cell]:
    """Every built-in cell, in the configurations of the test suite's one list (`tests/reference_cells.py`):
    the four Elman activations, LSTM, GRU, then the other families.

    The layer-normalised LSTM takes ε = 1e-3 (Keras's default) rather than 1e-5: from the zero initial
    carry, LN(h w_hh) starts at its most curved point (third derivative ~ε^(-3/2)), where central
    differences at their usual step are off by ~1e-6 while the three exact oracles still agree to
    round-off (tests/test_bptt.py shows both at ε = 1e-5).
    """
    from tests.reference_cells import REFERENCES

    return [ref.make(hidden_size) for ref in REFERENCES.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, the LSTM only")
    args = parser.parse_args(argv)
    cfg = Config(batch=3, time=5, n_directions=2) if args.quick else Config()
    key = jax.random.key(cfg.seed)
    k_x, k_p = jax.random.split(key)
    xs = jax.random.normal(k_x, (cfg.batch, cfg.time, cfg.input_size))
    # lengths include an empty sequence and a full one
    lengths = jnp.array([cfg.time, 0, *range(1, cfg.batch - 1)], dtype=jnp.int32)[: cfg.batch]
    chosen = cells(cfg.hidden_size)
    if args.quick:
        chosen = [c for c in chosen if c.name == "lstm"]

    lstm = next(c for c in chosen if c.name == "lstm")
    first = rj.gradcheck(lstm, lstm.init(k_p, cfg.input_size), xs, lengths=lengths)
    print(first, end="\n\n")

    header = (
        f"{'cell':<16} {'lengths':<8} {'direction':<9} {'vs autodiff':>11} {'vs RTRL':>9} "
        f"{'vs complex step':>15} {'vs finite diff':>14}  ok"
    )
    print(header)
    print("-" * len(header))
    all_passed = first.passed
    for cell in chosen:
        params = cell.init(k_p, cfg.input_size)
        for use_lengths in (False, True):
            for reverse in (False, True):
                report = rj.gradcheck(
                    cell,
                    params,
                    xs,
                    lengths=lengths if use_lengths else None,
                    reverse=reverse,
                    n_directions=cfg.n_directions,
                )
                all_passed &= report.passed
                print(
                    f"{cell.name:<16} {'varied' if use_lengths else 'full':<8} "
                    f"{'reverse' if reverse else 'forward':<9} {report.max_autodiff_error:>11.2e} "
                    f"{report.max_rtrl_error:>9.2e} {report.max_complex_error:>15.2e} "
                    f"{report.max_fd_error:>14.2e}  {'yes' if report.passed else 'NO'}"
                )
    print(
        f"\nB={cfg.batch} T={cfg.time} I={cfg.input_size} H={cfg.hidden_size}, float64; tolerances "
        f"1e-10 (autodiff, RTRL, complex step) and 1e-6 (finite differences): "
        f"{'ALL PASSED' if all_passed else 'FAILURES'}"
    )
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
