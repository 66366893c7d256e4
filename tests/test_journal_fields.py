"""logs.py: each event to the journal as native fields (a datagram socket bound here
stands in for journald's), and the catalog that explains the MESSAGE_IDs."""

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from liveupdated import logs

ROOT = Path(__file__).resolve().parent.parent


def parse(datagram: bytes) -> dict[str, str]:
    """The native protocol: KEY=value lines, or KEY\\n<u64 le length><bytes>\\n."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
        else:
            size = int.from_bytes(after[:8], "little")
            fields[line.decode()] = after[8:8 + size].decode()
            rest = after[8 + size + 1:]
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    logs.configure("info", journal=path)
    try:
        yield sock
    finally:
        structlog.reset_defaults()
        sock.close()


def test_an_event_carries_session_token_phase_and_a_readable_message(
    journal: socket.socket,
) -> None:
    log = structlog.get_logger("liveupdated")
    log.error("fd_lost", session="vm-42", token="ram", hint="preserve it again")
    fields = parse(journal.recv(65536))
    assert fields["SESSION"] == "vm-42" and fields["TOKEN"] == "ram"
    assert fields["PRIORITY"] == "3"
    assert fields["MESSAGE"] == "fd lost: session=vm-42 token=ram (preserve it again)"
    assert fields["MESSAGE_ID"] == logs.MESSAGE_IDS["fd_lost"]
    assert fields["SYSLOG_IDENTIFIER"] == "liveupdated"
    log.info("state_changed", old="normal", new="prepared")
    started = parse(journal.recv(65536))
    assert started["PHASE"] == "prepared" and started["PRIORITY"] == "6"
    assert started["MESSAGE_ID"] == logs.MESSAGE_IDS["update_started"]
    log.info("state_changed", old="updated", new="normal")
    assert parse(journal.recv(65536))["MESSAGE_ID"] == logs.MESSAGE_IDS["update_finished"]
    log.error("reboot_failed", error="two\nlines")
    failed = parse(journal.recv(65536))
    assert failed["MESSAGE_ID"] == logs.MESSAGE_IDS["update_failed"]
    assert failed["LIVEUPDATED_ERROR"] == "two\nlines"  # the length-prefixed form
    log.info("session_created", session="vm-1")
    assert "MESSAGE_ID" not in parse(journal.recv(65536))


def test_a_journal_that_is_gone_falls_back_to_the_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", journal=str(tmp_path / "nobody"))
    try:
        structlog.get_logger("liveupdated").warning("fd_quarantined", session="s", token="t")
    finally:
        structlog.reset_defaults()
    assert re.match(r'<4>\{"session": "s", "token": "t", "event": "fd_quarantined"',
                    capsys.readouterr().err)


def test_journal_stream_names_the_stream(tmp_path: Path) -> None:
    with (tmp_path / "out").open("w") as out:
        st = os.fstat(out.fileno())
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            assert logs.stream_is_journal(out)
            os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
            assert not logs.stream_is_journal(out)
        finally:
            del os.environ["JOURNAL_STREAM"]


def test_the_catalog_explains_every_message_id() -> None:
    catalog = (ROOT / "packaging" / "liveupdated.catalog").read_text()
    ids = re.findall(r"^-- ([0-9a-f]{32})$", catalog, re.M)
    assert sorted(ids) == sorted(logs.MESSAGE_IDS.values())
