"""`jact demo`'s command line (the demo itself takes minutes; `make demo` runs it)."""

import pytest

from jact import cli


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--memory-batch", "-1"]])
def test_demo_rejects_non_positive_sizes(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  assert "must be positive" in capsys.readouterr().err


def test_demo_help_names_its_options(capsys):
  with pytest.raises(SystemExit):
    cli.main(["demo", "--help"])
  out = capsys.readouterr().out
  assert all(option in out for option in ("--steps", "--memory-batch", "--plot"))
