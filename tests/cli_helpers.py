"""Run ``evolve``'s CLI in-process the way a shell would, for tests that check exit codes and output."""

from __future__ import annotations

import sys

import pytest

from evolve import cli


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``evolve ARGV...`` through ``cli.main`` (its error handling included): (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["evolve", *argv]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err
