"""completions/liveupdatectl.bash: sourced in bash, it completes commands and options,
and knows every command and option the parser has."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from liveupdated.cli import _parser
from liveupdated.client import Client
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd

SCRIPT = Path(__file__).resolve().parent.parent / "completions" / "liveupdatectl.bash"


def complete(line: str, path: Path | None = None) -> list[str]:
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
    env = {**os.environ}
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", program],
                            capture_output=True, text=True, timeout=30, check=True, env=env)
    assert result.stderr == ""
    return sorted(w for w in result.stdout.splitlines() if w)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {k: v for k, v in action.choices.items() if k != "complete-names"}
    raise AssertionError("no subcommands")


def test_commands_and_options_complete() -> None:
    assert complete("liveupdatectl pr") == ["prepare", "preserve"]
    assert complete("liveupdatectl --") == ["--bus", "--help", "--json", "--version"]
    assert complete("liveupdatectl --bus system re") == ["ready-for-freeze", "reboot", "retrieve"]
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


async def test_session_names_and_tokens_come_from_the_daemon(
    client: Client, bus: PrivateBus, tmp_path: Path
) -> None:
    ctl = tmp_path / "liveupdatectl"
    ctl.write_text(f"#!/bin/sh\nexec {sys.executable} -m liveupdated.cli \"$@\"\n")
    ctl.chmod(0o755)
    fd = make_memfd(4096)
    for name in ("vm-a", "vm-b"):
        session = await client.create_session(name)
        await session.preserve_fd("ram", fd)
    await session.preserve_fd("rom", fd)
    at = f"liveupdatectl --bus {bus.address}"
    assert complete(f"{at} unpreserve ", tmp_path) == ["vm-a", "vm-b"]
    assert complete(f"{at} show vm-", tmp_path) == ["vm-a", "vm-b"]
    assert complete(f"{at} retrieve vm-b ", tmp_path) == ["ram", "rom"]
    assert complete(f"{at} quarantine ", tmp_path) == ["list", "release", "retrieve"]
    assert complete(f"{at} update --", tmp_path) == [
        "--bus", "--help", "--json", "--reboot-timeout", "--timeout"]
    assert complete("liveupdatectl --bus unix:path=/nonexistent unpreserve ", tmp_path) == []
    os.close(fd)
