"""README.md stays true to the code: the flag reference, the two commands, .ci/run."""

from __future__ import annotations

from pathlib import Path

from megatron_distill.arguments import format_flag_reference

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_flag_reference_matches_parser():
    begin, end = "<!-- flags:begin -->\n", "<!-- flags:end -->"
    section = README[README.index(begin) + len(begin) : README.index(end)]
    assert section.strip() == format_flag_reference().strip(), (
        "README flag reference is stale: regenerate it from format_flag_reference()"
    )


def test_the_two_commands_are_documented_and_ci_runs_the_test_command():
    install_and_run = "pip install -e . && bash launch/quickstart.sh"
    test_command = 'pip install -e ".[test]" && python -m pytest tests -q'
    assert install_and_run in README and test_command in README
    assert test_command in (REPO / ".ci" / "run").read_text()
