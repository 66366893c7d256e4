"""Cancel over a real bus: from PREPARED or FROZEN back to exactly NORMAL.

Same sessions, same fds (the very same files), no handover data left, the journal
consistent with what the daemon says; and a cancelled update followed by a full one
still carries everything.
"""

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import Timeout
from liveupdated.core.names import session_path
from liveupdated.core.orchestrator import Orchestrator
from liveupdated.core.records import CycleRecorded, Record, SessionCreated
from liveupdated.privatebus import PrivateBus
from tests.conftest import make_memfd
from tests.other_uid import OtherUid, content_digest, digest
from tests.rules_support import NOBODY, Host, Signals


@pytest.fixture
def host(bus: PrivateBus, tmp_path: Path) -> Iterator[Host]:
    with Host(bus, tmp_path) as h:
        yield h


def journal_state(records: list[Record]) -> list[Record]:
    """The state the journal holds, but the update history (a cancelled cycle is one)."""
    core = Orchestrator()
    for record in records:
        core.apply(record)
    # Sessions through a Prepare stay marked (never dropped for a departed client).
    return [replace(r, prepared=False) if isinstance(r, SessionCreated) else r
            for r in core.snapshot() if not isinstance(r, CycleRecorded)]


async def observable_state(
    host: Host, root: Client, nobody: OtherUid, sessions: list[SessionClient]
) -> dict[str, Any]:
    """Everything a client, systemd or the disk can see of the daemon's state."""
    fds = {s.name: await s.list_fds() for s in sessions}
    held = {f"{name}/{f.token}" for name, listed in fds.items() for f in listed}
    return {
        "state": await root.state(),
        "root_list": await root.list_sessions(),
        "nobody_list": await nobody.call("list_sessions"),
        "fds": fds,
        "properties": {s.name: await s.properties() for s in sessions},
        "open_fds": await host.open_fds(root),
        "fd_store_is_held_fds": host.notifications.wait_for(lambda n: set(n.store) == held, 5),
        "handover": host.handover_files(),
        "journal": journal_state(host.journal_records()),
    }


@pytest.mark.parametrize("cancel_from", ["prepared", "frozen"])
async def test_cancel_returns_exactly_to_normal(host: Host, cancel_from: str) -> None:
    await host.start("--freeze-timeout", "0.3")
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        signals = await Signals(root).subscribe()
        vm = await root.create_session("vm-root")
        ram = make_memfd(8192, b"root ram")
        await vm.preserve_fd("ram", ram)
        kvm = make_memfd(100, b"kvm")
        await vm.preserve_fd("kvm", kvm, ["ram"])
        os.close(kvm)
        await vm.delay_freeze(True)
        await nobody.call("create_session", name="65534-vm-nobody")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="disk",
                          data=b"disk".hex())
        theirs = SessionClient(root, "65534-vm-nobody",
                               session_path("65534-vm-nobody"))
        sessions = [vm, theirs]
        before = await observable_state(host, root, nobody, sessions)

        await root.prepare()
        await vm.ready_for_freeze()
        if cancel_from == "frozen":
            await root.freeze()
        assert await root.state() == cancel_from
        await root.cancel()
        await signals.wait_for(lambda s: ("normal" in s.state_properties()), "State=normal")

        assert await observable_state(host, root, nobody, sessions) == before
        expected = [("normal", "prepared")]
        if cancel_from == "frozen":
            expected.append(("prepared", "frozen"))
        expected.append((cancel_from, "normal"))
        assert signals.state_changes() == expected
        got = await vm.retrieve_fd("ram")
        assert os.fstat(got).st_ino == os.fstat(ram).st_ino, "Cancel replaced the held fd"
        os.close(got)
        os.close(ram)

        # ReadyForFreeze belonged to the cancelled update: the next Freeze waits again.
        await root.prepare()
        with pytest.raises(Timeout, match="vm-root"):
            await root.freeze()
        await vm.ready_for_freeze()
        await root.freeze()
        assert await root.state() == "frozen"


async def test_a_cancelled_update_then_a_full_one_carries_everything(host: Host) -> None:
    await host.start()
    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        vm = await root.create_session("vm-root")
        ram = make_memfd(1 << 20, b"before the cancelled update")
        await vm.preserve_fd("ram", ram)
        old = make_memfd(10, b"old")
        await vm.preserve_fd("old", old)
        os.close(old)
        await nobody.call("create_session", name="65534-vm-nobody")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="disk", data=b"v1".hex())

        await root.prepare()
        await root.freeze()
        await root.cancel()
        assert host.handover_files() == []

        # The VMs ran on after the cancel: new content, new and removed fds.
        os.pwrite(ram, b"after the cancelled update!", 0)
        await vm.unpreserve_fd("old")
        new = make_memfd(4096, b"new fd")
        await vm.preserve_fd("new", new, ["ram"])
        await nobody.call("unpreserve_fd", session="65534-vm-nobody", token="disk")
        await nobody.call("preserve_fd", session="65534-vm-nobody", token="disk", data=b"v2".hex(),
                          size=12288)
        want = {"ram": digest(ram), "new": digest(new)}
        os.close(ram)
        os.close(new)

        await root.prepare()
        await root.freeze()
        await host.reboot(root)

    async with await host.connect() as root, OtherUid(host.address, NOBODY) as nobody:
        assert await root.state() == "updated"
        vm = await root.retrieve_session("vm-root")
        assert sorted(f.token for f in await vm.list_fds()) == ["new", "ram"]
        for token, expected in want.items():
            fd = await vm.retrieve_fd(token)
            assert digest(fd) == expected, token
            os.close(fd)
        await nobody.call("retrieve_session", name="65534-vm-nobody")
        assert await nobody.call("retrieve_fd", session="65534-vm-nobody", token="disk") == (
            content_digest(b"v2", 12288)
        )
        await root.finish()
        assert await root.state() == "normal"
