"""Every example runs end to end in its --quick mode, and learns."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from examples import (
    adding_problem,
    captions,
    char_lm,
    digits,
    frame_labels,
    gradcheck_table,
    gradcheck_tour,
    seq2seq,
    speech_ctc,
)

ROOT = pathlib.Path(__file__).parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name != "__init__.py")


def run_example(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """``python *args`` from ``cwd`` with no PYTHONPATH: what a user types in a shell."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_imports_when_run_as_a_file(script, tmp_path):
    """``python examples/X.py`` (no package context, run from anywhere) finds rnnjax and ``examples.*`` of
    this clone; ``--help`` runs every import and stops before any training."""
    run = run_example([str(ROOT / "examples" / script), "--help"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith(f"usage: {script}")


def test_an_example_runs_as_a_module():
    run = run_example(["-m", "examples.gradcheck_tour", "--help"], ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("usage: gradcheck_tour.py")


def test_gradcheck_table_quick(capsys):
    assert gradcheck_table.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "ALL PASSED" in out
    assert "params.w_ih" in out and "lstm" in out


def test_digits_quick_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # plots go to runs/ under the working directory
    # as from the command line: float32 and standard promotion (optax's Adam is not strict-promotion safe)
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        histories = digits.main(["--quick", "--no-progress"])
    for name, h in histories.items():
        assert h["loss"][-1] < 0.9 * h["loss"][0], name
        assert h["test_accuracy"][-1] > 0.3, name  # chance is 0.1
    assert (tmp_path / "runs/digits/digits.png").stat().st_size > 0


def on_two_host_devices(script: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """``python -c script`` in a fresh process whose CPU is split into two XLA devices; it must succeed."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path])),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_digits_data_parallel_equals_one_device(tmp_path):
    """``--data-parallel`` on two host devices: every batch split over both, and the training follows the
    one-device run (the losses and accuracies of each epoch, to float32 rounding of the gradient sums)."""
    script = (
        "import json; from examples import digits\n"
        "args = ['--quick', '--no-progress', '--cells', 'lstm']\n"
        "print(json.dumps([digits.main(args)['lstm'], digits.main(args + ['--data-parallel'])['lstm']]))"
    )
    run = on_two_host_devices(script, tmp_path)
    assert "each batch split over 2 cpu devices" in run.stdout
    one, two = json.loads(run.stdout.strip().splitlines()[-1])
    assert (one["rows_per_device"], two["rows_per_device"]) == (64, 32)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
    np.testing.assert_allclose(two["test_accuracy"], one["test_accuracy"], atol=3 / 450)  # <= 3 test digits


def test_adding_problem_quick_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        results = adding_problem.main(["--quick", "--no-progress"])
    for (name, T), r in results.items():
        first, last = np.mean(r["losses"][:20]), np.mean(r["losses"][-20:])
        assert last < first, (name, T)  # the loss falls (to the mean predictor's 1/6 in a quick run)
        assert len(r["grad_norms"]) == len(r["grad_norms_first"]) == T and np.all(
            np.isfinite(r["grad_norms"])
        )
    # the vanishing gradient is visible already at T = 20: Elman's decays far more than the gated cells'
    ratio = {name: r["grad_norms"][0] / r["grad_norms"][-1] for (name, _), r in results.items()}
    assert ratio["elman"] < 1e-2 * min(ratio["lstm"], ratio["gru"])
    assert (tmp_path / "runs/adding_problem/adding_problem.png").stat().st_size > 0


def test_frame_labels_quick_bidirectional_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        results = frame_labels.main(["--quick", "--no-progress"])
    for r in results.values():
        assert np.mean(r["losses"][-10:]) < np.mean(r["losses"][:10])
    # labels depend on the future: only the bidirectional model can read it
    assert results["bidirectional"]["accuracy"] > 0.9
    assert results["bidirectional"]["accuracy"] > results["unidirectional"]["accuracy"] + 0.2
    assert (tmp_path / "runs/frame_labels/frame_labels.png").stat().st_size > 0


def test_captions_quick_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        results = captions.main(["--quick", "--no-progress"])
    assert np.mean(results["losses"][-10:]) < 0.5 * np.mean(results["losses"][:10])
    # whole captions spelled right well above chance (0.1 if it only knew the ten names)
    assert results["greedy_exact_match"] > 0.3 and results["beam_exact_match"] > 0.3
    assert (tmp_path / "runs/captions/captions.png").stat().st_size > 0


def test_gradcheck_tour_quick_catches_the_planted_bug(capsys):
    assert gradcheck_tour.main(["--quick"]) == 0  # everything passes, and the planted bug is caught
    out = capsys.readouterr().out
    assert "caught: True" in out
    assert "params['rnn'][0].fw.w_hh" in out.split("caught: True")[1]  # localised to the buggy layer
    assert "params['rnn'][1]" not in out.split("caught: True")[1].splitlines()[0]


def test_seq2seq_quick_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        results = seq2seq.main(["--quick", "--no-progress"])
    # 100 steps are too few for whole dates; the loss must fall well below uniform guessing (ln 13 = 2.56)
    assert np.mean(results["losses"][-10:]) < 0.75 * np.mean(results["losses"][:10])
    assert 0.0 <= results["greedy_exact_match"] <= 1.0 and 0.0 <= results["beam_exact_match"] <= 1.0
    assert (tmp_path / "runs/seq2seq/seq2seq.png").stat().st_size > 0


def test_seq2seq_data_is_consistent():
    """Every written style parses to the same ISO date it is labelled with, and held-out dates are excluded."""
    import datetime

    date = datetime.date(2021, 3, 5)
    texts = [seq2seq.write(date, s) for s in range(8)]
    assert texts[0] == "march 5, 2021" and texts[3] == "friday, march 5, 2021" and texts[5] == "05.03.2021"
    assert max(len(seq2seq.write(datetime.date(2000, 9, 27), s)) for s in range(8)) <= seq2seq.IN_LEN
    rng = np.random.default_rng(0)
    inputs, in_len, targets, _, dates = seq2seq.dataset(rng, 50)
    again = seq2seq.dataset(rng, 200, exclude=set(dates))
    assert not set(again[4]) & set(dates)
    for i in range(50):
        written = "".join(seq2seq.IN_CHARS[c] for c in inputs[i, : in_len[i]])
        assert written in {seq2seq.write(dates[i], s) for s in range(8)}
        assert np.all(inputs[i, in_len[i] :] == 0)  # padding
        iso = "".join(seq2seq.OUT_CHARS[t] for t in targets[i, :10])
        assert iso == dates[i].isoformat() and targets[i, 10] == seq2seq.END


def test_char_lm_quick_learns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        results = char_lm.main(["--quick", "--no-progress"])
    bits = results["val_bits"]
    assert bits[0] > 6.0  # log2(98) = 6.6 bits for a model that knows nothing
    assert bits[-1] < bits[0] - 1.0  # it has learnt the characters' frequencies at least
    assert len(results["samples"]) == len(bits) and all(len(t) == 60 for _, t in results["samples"])
    assert "validation" in capsys.readouterr().out
    assert (tmp_path / "runs/char_lm/char_lm.png").stat().st_size > 0
    assert (tmp_path / "runs/char_lm/samples.txt").read_text().startswith("--- step 0\ndef ")


def test_char_lm_quick_with_regularisers(tmp_path, monkeypatch):
    """The regularisers inside the recurrence train (masks drawn in training, zoneout's expectation in
    validation) and are refused out of range by the flag's name."""
    monkeypatch.chdir(tmp_path)
    flags = ["--quick", "--no-progress", "--steps", "20", "--checkpoint-every", "0"]
    reg = ["--dropout-state", "0.2", "--zoneout", "0.1", "--weight-drop", "0.2"]
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        results = char_lm.main(flags + reg)
        assert all(math.isfinite(b) for b in results["val_bits"])
        with pytest.raises(ValueError, match=r"--zoneout must be in \[0, 1\), got 1\.0"):
            char_lm.main([*flags, "--zoneout", "1.0"])


@pytest.mark.slow
def test_char_lm_data_parallel_equals_one_device(tmp_path):
    """``--data-parallel`` on two host devices: each window's tracks and the carry split over both, and the
    training follows the one-device run step by step (to float32 rounding of the gradient sums)."""
    script = (
        "import json; from examples import char_lm\n"
        "args = ['--quick', '--no-progress', '--steps', '40']\n"
        "print(json.dumps([char_lm.main(args), char_lm.main(args + ['--data-parallel'])]))"
    )
    run = on_two_host_devices(script, tmp_path)
    assert "the tracks split over 2 cpu devices" in run.stdout
    one, two = json.loads(run.stdout.strip().splitlines()[-1])
    assert (one["rows_per_device"], two["rows_per_device"]) == (16, 8)
    assert len(one["train_bits"]) == len(two["train_bits"]) == 40
    np.testing.assert_allclose(two["train_bits"], one["train_bits"], rtol=1e-4)
    np.testing.assert_allclose(two["val_bits"], one["val_bits"], rtol=1e-4)


def test_char_lm_corpus():
    text = "def f(x):\n\treturn x  # é\n"
    tokens = char_lm.encode(text)
    assert tokens.max() < char_lm.VOCAB_SIZE and char_lm.decode_text(tokens) == text.replace("é", "?")
    cfg = char_lm.QUICK
    train, val = char_lm.load_corpus(cfg)
    assert len(train) == cfg.max_train_chars and len(val) > 10_000
    assert "import" in char_lm.decode_text(val[:20_000])  # real Python source
    t = char_lm.tracks(np.arange(10), 3)
    assert t.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_speech_ctc_quick_learns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        results = speech_ctc.main(["--quick", "--no-progress"])
    assert np.mean(results["losses"][-10:]) < 0.5 * np.mean(results["losses"][:10])
    assert results["label_error_rate"] < 0.8  # an empty transcription scores 1.0
    assert (tmp_path / "runs/speech_ctc/speech_ctc.png").stat().st_size > 0


def test_speech_ctc_rejects_no_steps():
    with pytest.raises(ValueError, match=r"--steps must be >= 1, got 0"):
        speech_ctc.main(["--quick", "--steps", "0"])


def test_speech_ctc_decoding_and_scoring():
    assert speech_ctc.edit_distance([1, 2, 3], [1, 3]) == 1
    assert speech_ctc.edit_distance([], [4, 4]) == 2
    assert speech_ctc.edit_distance([1, 2, 3, 4], [2, 1, 3, 5]) == 3
    # frames: blank, 3, 3, blank, 3, 2, 2, then padding that must be ignored
    path = np.array([0, 3, 3, 0, 3, 2, 2, 1, 1])
    logits = np.eye(4)[path]
    assert speech_ctc.best_path(logits, 7) == [3, 3, 2]
    cfg = speech_ctc.QUICK
    feats, lengths, labels, label_lengths = speech_ctc.utterances(np.random.default_rng(0), 20, cfg)
    assert feats.shape == (20, speech_ctc.max_frames(cfg), cfg.frame // 2 + 1)
    assert np.all(lengths <= feats.shape[1]) and np.all(label_lengths >= cfg.min_labels)
    for i in range(20):
        assert np.all(feats[i, lengths[i] :] == 0)
        assert np.all(labels[i, : label_lengths[i]] >= 1) and np.all(labels[i, label_lengths[i] :] == 0)
        # every symbol needs at least min_tone_frames frames and a pause: CTC can align it
        assert lengths[i] >= label_lengths[i] * (cfg.min_tone_frames + 1)
