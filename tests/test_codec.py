"""The strict JSON codec: every record round-trips; every way JSON can be wrong is a
DecodeError naming the class, the field and the problem."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import pytest

from liveupdated.backends.kernel import CarriedFd as KernelFd
from liveupdated.backends.kernel import Index, Manifest
from liveupdated.backends.simulated import CarriedFd, KexecRecord
from liveupdated.config import Config
from liveupdated.core.codec import DecodeError, from_dict, from_json, to_json
from liveupdated.core.records import (
    CycleRecorded,
    DaemonStarted,
    FdCorrupted,
    FdLost,
    FdPreserved,
    FdQuarantined,
    FdReleased,
    FdRestored,
    FreezeDelaySet,
    HandoverWritten,
    KexecSimulated,
    PhaseChanged,
    QuarantineReleased,
    Rebooted,
    RebootFailed,
    RebootStarted,
    Record,
    RecoveryDecided,
    SessionCreated,
    SessionDropped,
    SessionFinished,
    SessionReady,
    UpdateCycle,
    decode_group,
    decode_record,
    decode_records,
)

EVERY_RECORD: list[Record] = [
    SessionCreated(session="vm", uid=1000, unit="vmm@a.service", client=":1.5"),
    FdPreserved(session="vm", token="ram", kind="memfd", requires=("kvm", "ünï \"q\"\n"),
                size=1 << 40, name="guest", seals=15),
    FdReleased(session="vm", token="ram", reason="unpreserved"),
    FdLost(session="vm", token="ram"),
    FdCorrupted(session="vm", token="ram", size=4096),
    FdRestored(session="vm", token="ram"),
    SessionDropped(session="vm", reason="closed"),
    FreezeDelaySet(session="vm", enabled=False),
    SessionReady(session="vm"),
    SessionFinished(session="vm"),
    PhaseChanged(old="normal", new="prepared", at_usec=1_700_000_000_000_000),
    Rebooted(boot_id="0123456789abcdef0123456789abcdef", blackout_usec=0),
    RebootStarted(boot_id="0123456789abcdef0123456789abcdef", at_usec=1),
    RebootFailed(reason="ENOSPC"),
    RecoveryDecided(decision="the handover is used", evidence="boot id b", at_usec=3),
    KexecSimulated(boot_id="0123456789abcdef0123456789abcdef"),
    FdQuarantined(session="vm", token="ram", size=4096, reason="its session was lost"),
    QuarantineReleased(session="vm", token="ram", by_uid=0),
    HandoverWritten(at_usec=5, fds=3, bytes=1 << 40),
    CycleRecorded(cycle=UpdateCycle(started_usec=1, prepared_by=0, outcome="cancelled")),
    DaemonStarted(version="0.2.0", boot_id="0123456789abcdef0123456789abcdef", at_usec=7),
]


def test_every_record_type_is_covered() -> None:
    assert {type(r) for r in EVERY_RECORD} == set(get_args(Record))


@pytest.mark.parametrize("record", EVERY_RECORD, ids=lambda r: type(r).__name__)
def test_every_record_round_trips_with_its_type_first(record: Record) -> None:
    payload = to_json(record)
    assert payload.startswith(b'{"type":"%s",' % record.type.encode())
    assert decode_record(payload) == record
    assert decode_record(payload.decode()) == record


def test_records_decode_many_at_once() -> None:
    assert decode_records([to_json(r) for r in EVERY_RECORD]) == EVERY_RECORD
    assert decode_records([]) == []


def test_a_list_of_records_is_one_decisions_group() -> None:
    """A journal frame may hold the records of one decision as a list: decode_group and
    decode_records take it, decode_record (one record) does not, and a list holding
    anything but records is refused whole."""
    group = b"[" + b",".join(to_json(r) for r in EVERY_RECORD[:3]) + b"]"
    assert decode_group(group) == EVERY_RECORD[:3]
    assert decode_group(to_json(EVERY_RECORD[3])) == [EVERY_RECORD[3]]
    assert decode_records([to_json(EVERY_RECORD[3]), group]) == [EVERY_RECORD[3],
                                                                 *EVERY_RECORD[:3]]
    with pytest.raises(DecodeError, match="expected a JSON object, got list"):
        decode_record(group)
    for bad in (b"[" + to_json(EVERY_RECORD[0]) + b",7]", b"[[" + SESSION_READY.encode() + b"]]",
                b'[{"type":"session_ready"}]'):
        with pytest.raises(DecodeError):
            decode_group(bad)
        with pytest.raises(DecodeError):
            decode_records([to_json(EVERY_RECORD[0]), bad])


def test_the_json_is_compact_utf8_in_declared_order() -> None:
    record = FdPreserved(session="vm", token="ünï", kind="memfd", requires=(), size=1,
                         name="g", seals=0)
    assert to_json(record) == (
        '{"type":"fd_preserved","session":"vm","token":"ünï","kind":"memfd","requires":[],'
        '"size":1,"name":"g","seals":0,"dev":0,"ino":0}'
    ).encode()


def test_backend_records_round_trip_nested() -> None:
    fd = CarriedFd(session="vm", token="ram", file="vm.ram", size=8192, name="g", seals=1,
                   position=7, extents=[(0, 4096), (8192, 4096)], crc32=0xDEADBEEF)
    kexec = KexecRecord(boot_id="b", fds=[fd, fd])
    assert from_json(KexecRecord, to_json(kexec)) == kexec
    assert isinstance(from_json(KexecRecord, to_json(kexec)).fds[0].extents[0], tuple)
    versioned = KexecRecord(boot_id="b", fds=[fd], version="0.2.0")
    assert from_json(KexecRecord, to_json(versioned)) == versioned
    assert from_json(KexecRecord, '{"boot_id":"b","fds":[]}').version == ""  # before 0.2.0
    manifest = Manifest(session="vm", boot_id="b", fds=(
        KernelFd(token="ram", kernel_token=1, kind="memfd", requires=(), name="", seals=0,
                 size=0),))
    assert from_json(Manifest, to_json(manifest)) == manifest
    index = Index(boot_id="b", sessions=("vm", "vm-2"))
    assert from_json(Index, to_json(index)) == index


def changed(record: Record, **fields: object) -> str:
    """The JSON of `record` with `fields` set (added, if it has no such field)."""
    return json.dumps({**json.loads(to_json(record)), **fields})


SESSION_READY = '{"type":"session_ready","session":"vm"}'
CORRUPTED = FdCorrupted(session="vm", token="t", size=1)
PRESERVED = FdPreserved(session="vm", token="t", kind="memfd", requires=(), size=1, name="g",
                        seals=0)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ('{"type":"session_ready","session":"vm","extra":1}',
         "SessionReady: unknown field(s) ['extra']"),
        ('{"type":"session_ready","session":"vm","extra":1,"more":2}',
         "SessionReady: unknown field(s) ['extra', 'more']"),
        ('{"type":"session_ready","extra":"vm"}', "SessionReady: unknown field(s) ['extra']"),
        ('{"type":"fd_lost","session":"vm"}', "FdLost.token: missing"),
        ('{"session":"vm"}', "Record: unknown type None"),
        (changed(CORRUPTED, size=True), "FdCorrupted.size: expected int, got bool True"),
        (changed(CORRUPTED, size="1"), "FdCorrupted.size: expected int, got str '1'"),
        (changed(CORRUPTED, size=1.0), "FdCorrupted.size: expected int, got float 1.0"),
        (changed(CORRUPTED, size=None), "FdCorrupted.size: expected int, got NoneType"),
        (changed(CORRUPTED, session=5), "FdCorrupted.session: expected str, got int 5"),
        ('{"type":"freeze_delay_set","session":"vm","enabled":1}',
         "FreezeDelaySet.enabled: expected bool, got int 1"),
        ('{"type":"session_ready","session":"vm","type":"session_dropped"}',
         "SessionDropped.reason: missing"),
        (changed(PRESERVED, requires=["a", 1]),
         "FdPreserved.requires: item 1: expected str, got int 1"),
        (changed(PRESERVED, requires="a"), "FdPreserved.requires: expected list, got str 'a'"),
        (changed(PRESERVED, requires={}), "FdPreserved.requires: expected list, got dict"),
        ('{"type":"no_such_record"}', "Record: unknown type 'no_such_record'"),
        ('{"type":["session_ready"],"session":"vm"}',
         "Record: unknown type ['session_ready']"),
        ('{"type":1}', "Record: unknown type 1"),
        ('"session_ready"', "Record: expected a JSON object, got str"),
        ("null", "Record: expected a JSON object, got NoneType"),
        ("7", "Record: expected a JSON object, got int"),
        ('{"type":"session_ready",', "Record: invalid JSON"),
        ("", "Record: invalid JSON"),
        (SESSION_READY + SESSION_READY, "Record: invalid JSON"),
        ("NaN", "Record: expected a JSON object, got float"),
    ],
)
def test_a_payload_that_is_not_a_valid_record_is_a_decode_error(payload: str, error: str) -> None:
    with pytest.raises(DecodeError, match=f"^{re.escape(error)}"):
        decode_record(payload.encode())
    with pytest.raises(DecodeError):
        decode_records([to_json(EVERY_RECORD[0]), payload.encode()])


def test_invalid_utf8_is_a_decode_error_and_a_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Record: invalid JSON"):
        decode_record(b'{"type":"session_ready","session":"\xff"}')
    assert issubclass(DecodeError, ValueError)  # what the journal and the backends catch


def test_a_wrong_literal_is_named() -> None:
    with pytest.raises(DecodeError, match=r"^FdLost.type: expected one of \['fd_lost'\], got str"):
        from_dict(FdLost, {"type": "fd_released", "session": "vm", "token": "t"})
    with pytest.raises(DecodeError, match=r"^Index.version: expected int, got bool True"):
        from_json(Index, '{"version":true,"boot_id":"b","sessions":[]}')
    with pytest.raises(DecodeError, match=r"^Index.version: expected one of \[1\], got int 2"):
        from_json(Index, '{"version":2,"boot_id":"b","sessions":[]}')


def test_many_payloads_must_hold_one_value_each() -> None:
    one = to_json(EVERY_RECORD[0])
    with pytest.raises(DecodeError, match="2 payloads hold 3 values"):
        decode_records([one + b"," + one, one])
    with pytest.raises(DecodeError, match="1 payloads hold 0 values"):
        decode_records([b" "])


def test_nested_errors_name_the_path_to_the_bad_value() -> None:
    fd = {"session": "vm", "token": "t", "file": "f", "size": 0, "name": "", "seals": 0,
          "position": 0, "extents": [[0, 1]], "crc32": 0}

    def kexec(*fds: dict[str, object]) -> str:
        return json.dumps({"boot_id": "b", "fds": fds})

    assert from_json(KexecRecord, kexec(fd)).fds[0].extents == [(0, 1)]
    with pytest.raises(DecodeError, match=r"^KexecRecord.fds: item 1: CarriedFd.extents: "
                                          r"item 0: expected a list of 2 items, got list"):
        from_json(KexecRecord, kexec(fd, {**fd, "extents": [[0, 1, 2]]}))
    with pytest.raises(DecodeError, match=r"^KexecRecord.fds: item 0: CarriedFd.extents: "
                                          r"item 0: item 1: expected int, got str"):
        from_json(KexecRecord, kexec({**fd, "extents": [[0, "1"]]}))
    with pytest.raises(DecodeError, match=r"^KexecRecord.fds: item 0: expected dict, got list"):
        from_json(KexecRecord, '{"boot_id":"b","fds":[[]]}')
    with pytest.raises(DecodeError, match=r"^KexecRecord.fds: item 0: CarriedFd.size: missing"):
        from_json(KexecRecord, kexec({k: v for k, v in fd.items() if k != "size"}))


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    path: Path
    parent: Path | None = None
    level: Literal["low", "high"] = "low"
    tags: tuple[str, ...] = ()


def test_paths_optionals_and_defaults() -> None:
    assert from_dict(Options, {"path": "/a"}) == Options(path=Path("/a"))
    full = Options(path=Path("/a"), parent=Path("/"), level="high", tags=("x",))
    assert to_json(full) == b'{"path":"/a","parent":"/","level":"high","tags":["x"]}'
    assert from_json(Options, to_json(full)) == full
    assert from_json(Options, to_json(Options(path=Path("b")))) == Options(path=Path("b"))
    with pytest.raises(DecodeError, match=r"^Options.path: expected str, got int"):
        from_dict(Options, {"path": 1})
    with pytest.raises(DecodeError, match=r"^Options.parent: expected str, got int"):
        from_dict(Options, {"path": "/a", "parent": 1})
    with pytest.raises(DecodeError, match=r"^Options.level: expected one of \['low', 'high'\]"):
        from_dict(Options, {"path": "/a", "level": "mid"})
    with pytest.raises(DecodeError, match=r"^Options.path: missing"):
        from_dict(Options, {"level": "low"})


def test_classes_the_codec_cannot_build_are_refused_at_first_use() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        n: int

    @dataclass(frozen=True, slots=True)
    class Floats:
        x: float

    with pytest.raises(TypeError, match="needs slots=True"):
        from_dict(NoSlots, {"n": 1})
    with pytest.raises(TypeError, match="no check for the type"):
        from_dict(Floats, {"x": 1.0})


def test_config_checks_its_fields() -> None:
    assert Config(freeze_timeout=5).freeze_timeout == 5
    for bad in ({"backend": "qemu"}, {"max_sessions": "3"}, {"max_sessions": True},
                {"state_dir": "/var/lib/x"}, {"handover_dir": 1}, {"freeze_timeout": "1"}):
        with pytest.raises(ValueError, match=f"^Config.{next(iter(bad))}: "):
            Config(**bad)
    with pytest.raises(TypeError):
        Config(no_such_option=1)  # type: ignore[call-arg]


def test_a_record_that_replay_could_not_read_is_never_written() -> None:
    with pytest.raises(TypeError, match="expected int"):
        to_json(SessionCreated(session="vm", uid=True, unit="", client=":1.1"))
