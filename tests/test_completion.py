"""completions/liveupdatectl.bash: sourced in bash, it completes commands and options,
and knows every command and option the parser has."""

import argparse
import subprocess
from pathlib import Path

from liveupdated.cli import _parser

SCRIPT = Path(__file__).resolve().parent.parent / "completions" / "liveupdatectl.bash"


def complete(line: str) -> list[str]:
    """What bash offers for the last word of `line` (empty after a trailing space)."""
    words = line.split(" ")
    program = f"""
source {SCRIPT}
COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE='{line}'
COMP_POINT={len(line)}
_liveupdatectl
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program],
                            capture_output=True, text=True, timeout=30, check=True)
    assert result.stderr == ""
    return sorted(w for w in result.stdout.splitlines() if w)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_commands_and_options_complete() -> None:
    assert complete("liveupdatectl pr") == ["prepare", "preserve"]
    assert complete("liveupdatectl --") == ["--bus", "--help", "--json", "--version"]
    assert complete("liveupdatectl --bus system re") == ["reboot", "retrieve"]
    assert complete("liveupdatectl --bus ") == ["session", "system", "unix:path="]
    assert complete("liveupdatectl preserve --") == ["--bus", "--help", "--json", "--requires"]
    assert complete("liveupdatectl demo --") == ["--help", "--json", "--size"]
    assert "bash" in complete("liveupdatectl retrieve vm ram --exec bas")


def test_it_knows_every_command_and_option_of_the_parser() -> None:
    assert complete("liveupdatectl ") == sorted(subparsers())
    for name, parser in subparsers().items():
        offered = set(complete(f"liveupdatectl {name} --"))
        wanted = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        assert wanted <= offered, (name, wanted - offered)
