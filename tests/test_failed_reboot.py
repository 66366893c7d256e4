"""A reboot that does not happen never costs a VM its memory, and a retried PreserveFd
after a crash is the content that comes back.

The reboot action fails, or "succeeds" with no reboot following: the daemon stays,
frozen, its handover kept, says RebootFailed, and Reboot again or Cancel works; after a
restart with the full fd store, or with an empty one and no sign of a new boot (what a
container's reboot looks like from inside when its boot id is the host's), the update
is driven on to UPDATED with the documented commands and every fd comes back byte-exact.
"""

import asyncio
import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from liveupdated import durable
from liveupdated.client import Client, SessionClient
from liveupdated.core.errors import TokenExists
from liveupdated.core.names import session_path
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import Notifications
from tests.conftest import Host, make_memfd
from tests.test_recovery import reboot_failures


def _content(seed: int) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(rng.randrange(1, 3) * 4096 + rng.randrange(4096))


async def _preserve(client: Client, contents: dict[str, bytes]) -> list[int]:
    session = await client.create_session("vm")
    fds = []
    for token, data in contents.items():
        fd = make_memfd(len(data), data, name=token)
        await session.preserve_fd(token, fd)
        fds.append(fd)
    return fds


async def _back(client: Client, contents: dict[str, bytes]) -> None:
    session = await client.retrieve_session("vm")
    for token, data in contents.items():
        fd = await session.retrieve_fd(token)
        try:
            assert os.fstat(fd).st_size == len(data)
            assert os.pread(fd, len(data) + 1, 0) == data, token
        finally:
            os.close(fd)


def _fresh_store(host: Host) -> Notifications:
    """An empty fd store, as after a reboot that systemd did not carry it across."""
    host.notifications.close()
    host.notifications = Notifications()
    return host.notifications


@pytest.mark.parametrize(("action", "expected"), [
    (("--reboot-action", "false"), "exit status 1"),
    (("--reboot-action", "true", "--reboot-timeout", "0.3"), "no reboot followed"),
])
@pytest.mark.parametrize("store_after", ["full", "empty"])
async def test_a_reboot_that_does_not_follow_keeps_every_fd(
    host: Host, bus: PrivateBus, action: tuple[str, ...], expected: str, store_after: str
) -> None:
    contents = {f"fd{n}": _content(n + len(store_after)) for n in range(3)}
    daemon = host.start_now(*action)
    async with await Client.connect(bus.address) as host_client, \
            await Client.connect(bus.address) as vmm:
        fds = await _preserve(vmm, contents)
        await host_client.prepare()
        await host_client.freeze()
        async with reboot_failures(bus.address) as failures:
            await host_client.reboot()
            reason = await asyncio.wait_for(failures.get(), 30)
        assert expected in reason
        assert daemon.process is not None and daemon.process.poll() is None  # still serving
        assert await host_client.state() == "frozen"
        assert host.handover_files(), "the handover is kept"
        # Reboot may be called again: it fails the same way and changes nothing.
        async with reboot_failures(bus.address) as failures:
            await host_client.reboot()
            assert expected in await asyncio.wait_for(failures.get(), 30)
        assert daemon.stop() == 0  # stopped by hand: the reboot never came
        if store_after == "empty":
            _fresh_store(host)
        host.start_now("--reboot-action", "exit")
        assert await host_client.state() == "frozen"
        for fd in fds:  # the VMM's own copies go: only the daemon's remain
            os.close(fd)
        await host_client.reboot()
        assert host.daemon is not None and host.daemon.wait(60) == 0
        _fresh_store(host)
        host.start_now("--reboot-action", "exit")
        assert await host_client.state() == "updated"
        await _back(vmm, contents)
        await host_client.finish()
        [cycle] = (await host_client.get_history())[-1:]
        assert cycle["outcome"] == "finished"
        assert cycle["reboots_failed"] >= 2
        assert any(expected in note for note in cycle["notes"])
        shown = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "liveupdated.cli", "--bus", bus.address,
                             "history"], capture_output=True, text=True, check=True)
        assert "REBOOTS_FAILED" in shown.stdout and expected in shown.stdout
        if store_after == "empty":
            assert any("handover is used" in note for note in cycle["notes"])


async def test_cancel_after_a_failed_reboot_gives_every_fd_back_in_normal(
    host: Host, bus: PrivateBus
) -> None:
    contents = {"ram": _content(7), "state": _content(8)}
    host.start_now("--reboot-action", "false")
    async with await Client.connect(bus.address) as host_client, \
            await Client.connect(bus.address) as vmm:
        fds = await _preserve(vmm, contents)
        await host_client.prepare()
        await host_client.freeze()
        async with reboot_failures(bus.address) as failures:
            await host_client.reboot()
            await asyncio.wait_for(failures.get(), 30)
        assert host.daemon is not None
        host.daemon.kill()  # a crash, and the store is gone too: only the handover has them
        _fresh_store(host)
        host.start_now("--reboot-action", "false")
        assert await host_client.state() == "frozen"
        await host_client.cancel()
        assert await host_client.state() == "normal"
        assert not host.handover_files(), "the Cancel is durable: the handover goes"
        held = SessionClient(vmm, "vm", session_path("vm"))
        for token, data in contents.items():
            fd = await held.retrieve_fd(token)
            assert os.pread(fd, len(data) + 1, 0) == data
            os.close(fd)
        for fd in fds:
            os.close(fd)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_a_retried_preserve_fd_after_a_crash_is_what_comes_back(
    bus: PrivateBus, tmp_path: Path
) -> None:
    """A kill at every durable point of a PreserveFd; the VMM retries the token with
    other content (after UnpreserveFd if the first one was recorded after all); a kill
    -9, a clean restart and ReleaseQuarantined of whatever recovery kept: RetrieveFd
    hands back the acknowledged content every time."""
    # A dry run on a fresh machine: which points a start, a CreateSession and the
    # PreserveFd pass (the same on every fresh machine).
    log = tmp_path / "points.log"
    (tmp_path / "dry").mkdir()
    with Host(bus, tmp_path / "dry") as dry:
        dry.start_now(env={durable.POINTS_LOG_ENV: str(log)})
        async with await Client.connect(bus.address) as vmm:
            session = await vmm.create_session("vm")
            first = _lines(log)
            fd = make_memfd(4096, b"probe")
            await session.preserve_fd("ram", fd)
            os.close(fd)
            last = _lines(log)
    assert last > first
    for nth in range(first + 1, last + 1):
        old, new = _content(nth), _content(1000 + nth)
        (tmp_path / f"crash-{nth}").mkdir()
        with Host(bus, tmp_path / f"crash-{nth}") as host:
            host.start_now(env={durable.CRASH_AT_POINT_ENV: str(nth)})
            async with await Client.connect(bus.address) as vmm:
                session = await vmm.create_session("vm")
                fd_old = make_memfd(len(old), old, name="old")
                with contextlib.suppress(Exception):  # the daemon dies mid-call
                    await session.preserve_fd("ram", fd_old)
                assert host.daemon is not None and host.daemon.wait(30) != 0
                host.start_now()
                fd_new = make_memfd(len(new), new, name="new")
                try:
                    await session.preserve_fd("ram", fd_new)
                except TokenExists:  # the first was recorded after all: replaced
                    await session.unpreserve_fd("ram")
                    await session.preserve_fd("ram", fd_new)
                os.close(fd_old)
                os.close(fd_new)
                for restart in ("kill -9", "clean restart", "release the quarantine"):
                    if restart == "kill -9":
                        host.crash_now()
                    else:
                        if restart == "release the quarantine":
                            for q in await vmm.list_quarantined():
                                await vmm.release_quarantined(q.id)
                        assert host.daemon is not None and host.daemon.stop() == 0
                        host.start_now()
                    fd = await session.retrieve_fd("ram")
                    got = os.pread(fd, len(new) + 1, 0)
                    os.close(fd)
                    assert got == new, f"crash at point {nth}, after {restart}"
