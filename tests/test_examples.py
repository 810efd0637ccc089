"""Every example runs end to end in its --quick mode."""

from __future__ import annotations

from examples import gradcheck_table


def test_gradcheck_table_quick(capsys):
    assert gradcheck_table.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "ALL PASSED" in out
    assert "params.w_ih" in out and "lstm" in out
