"""Session.Finish on the simulated backend removes the session's handover files by the
names its record gives them, so a handover written by 0.3.0 (whose object-path escaping
left a leading digit alone: `65534_2dvm-pack`, now `_365534_2dvm-pack`) is cleaned up
too, not left on disk until the global Finish."""

import dataclasses
import os
import zlib
from pathlib import Path

from liveupdated.backends.simulated import (
    DATA_DIR,
    PACK_BYTES,
    PACK_SUFFIX,
    RECORD_NAME,
    KexecRecord,
    SimulatedBackend,
)
from liveupdated.core.codec import from_json, to_json
from liveupdated.core.names import escape_path_label
from liveupdated.core.orchestrator import FdEntry

SESSION = "65534-vm"  # a non-root session: its name starts with the uid's digits
OLD_LABEL = "65534_2dvm"  # how 0.3.0 escaped it


def entry(token: str) -> FdEntry:
    return FdEntry(token, "memfd", (), 0, "ram", 0)


def memfd_of(size: int) -> int:
    fd = os.memfd_create("ram")
    os.pwrite(fd, b"x" * size, 0)
    return fd


def read_record(area: Path) -> KexecRecord:
    body = (area / RECORD_NAME).read_bytes().rpartition(b"\n")[0]
    return from_json(KexecRecord, body)


def as_written_by_0_3_0(area: Path) -> set[str]:
    """Rename the session's files as 0.3.0 named them, and its record to match."""
    record = read_record(area)
    fds = []
    for carried in record.fds:
        if carried.session != SESSION:
            fds.append(carried)
            continue
        old = carried.file.replace(escape_path_label(SESSION), OLD_LABEL, 1)
        os.rename(area / DATA_DIR / carried.file, area / DATA_DIR / old)
        fds.append(dataclasses.replace(carried, file=old))
    body = to_json(dataclasses.replace(record, fds=fds, version="0.3.0"))
    (area / RECORD_NAME).write_bytes(body + b"\n" + str(zlib.crc32(body)).encode())
    return {p.name for p in (area / DATA_DIR).iterdir()}


def test_a_finished_session_of_an_older_release_leaves_no_data_behind(tmp_path: Path) -> None:
    fds = {(SESSION, "small"): memfd_of(4096), (SESSION, "big"): memfd_of(PACK_BYTES + 4096),
           (SESSION, "kept"): memfd_of(PACK_BYTES + 8192), ("vm2", "small"): memfd_of(4096)}
    area = tmp_path / "handover"
    try:
        SimulatedBackend(area).write_handover(fds, {k: entry(k[1]) for k in fds}, "boot",
                                              lambda n: None)
        files = as_written_by_0_3_0(area)
        assert files == {f"{OLD_LABEL}{PACK_SUFFIX}", f"{OLD_LABEL}.big", f"{OLD_LABEL}.kept",
                         f"vm2{PACK_SUFFIX}"}
        backend = SimulatedBackend(area)
        assert backend.find_handover() is not None  # as the daemon's start loads it
        os.close(backend.retrieve_fd((SESSION, "small"), entry("small")))
        os.close(backend.retrieve_fd((SESSION, "kept"), entry("kept")))
        backend.finish_session(SESSION, ["big"])
        # The pack and the released fd's file went; the retrieved large fd's file is left
        # for Finish, as for a session of this release; the other session is untouched.
        assert {p.name for p in (area / DATA_DIR).iterdir()} == {
            f"{OLD_LABEL}.kept", f"vm2{PACK_SUFFIX}"}
        os.close(backend.retrieve_fd(("vm2", "small"), entry("small")))
    finally:
        for fd in fds.values():
            os.close(fd)


def test_a_record_naming_a_file_outside_the_area_removes_nothing_there(
    tmp_path: Path,
) -> None:
    fds = {(SESSION, "big"): memfd_of(PACK_BYTES + 4096)}
    area = tmp_path / "handover"
    outside = tmp_path / "precious"
    outside.write_text("not the daemon's")
    try:
        SimulatedBackend(area).write_handover(fds, {k: entry(k[1]) for k in fds}, "boot",
                                              lambda n: None)
        record = read_record(area)
        planted = [dataclasses.replace(c, file="../../precious") for c in record.fds]
        body = to_json(dataclasses.replace(record, fds=planted))
        (area / RECORD_NAME).write_bytes(body + b"\n" + str(zlib.crc32(body)).encode())
        backend = SimulatedBackend(area)
        backend.find_handover()
        backend.finish_session(SESSION, ["big"])
        assert outside.read_text() == "not the daemon's"
    finally:
        for fd in fds.values():
            os.close(fd)
