"""The update history: every cycle, phase by phase, kept across compaction and restarts."""

import json
import os
import subprocess
import sys

from liveupdated.client import Client
from liveupdated.contract import HISTORY_KEPT
from liveupdated.core.orchestrator import Caller, Orchestrator
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, make_memfd

ROOT = Caller(uid=0, unit="", client=":1.1", admin=True)


def _cycle(core: Orchestrator, end: str) -> None:
    core.prepare(ROOT)
    core.done("Prepare")
    if end == "cancel":
        core.cancel(ROOT)
        core.done("Cancel")
        return
    attempt = core.begin_freeze(ROOT)
    core.freeze(ROOT, {}, attempt)
    core.done("Freeze", attempt)
    core.begin_reboot(ROOT, "old-boot")
    core.handover_written(0, 0)
    core.rebooted("old-boot")
    core.finish(ROOT)
    core.done("Finish")


def test_the_history_keeps_the_last_cycles_across_compaction() -> None:
    clock = iter(range(1, 10**6))
    core = Orchestrator(clock_usec=lambda: next(clock))
    for i in range(HISTORY_KEPT + 3):
        _cycle(core, "cancel" if i % 2 else "finish")
    core.prepare(ROOT)  # one under way
    assert len(core.history) == HISTORY_KEPT
    assert [c.outcome for c in core.history[-2:]] == ["cancelled", "finished"]
    assert core.cycle is not None and core.cycle.outcome == "in progress"
    replayed = Orchestrator()
    for record in core.snapshot():
        replayed.apply(record)
    assert replayed.history == core.history
    assert replayed.cycle == core.cycle


def test_a_finished_cycle_has_every_phase_in_order() -> None:
    clock = iter(range(1000, 10**6, 1000))
    core = Orchestrator(clock_usec=lambda: next(clock))
    _cycle(core, "finish")
    [cycle] = core.history
    times = [cycle.started_usec, cycle.frozen_usec, cycle.reboot_usec,
             cycle.handover_written_usec, cycle.rebooted_usec, cycle.ended_usec]
    assert all(times) and times == sorted(times)
    assert (cycle.prepared_by, cycle.frozen_by, cycle.reboot_by, cycle.ended_by) == (0,) * 4
    assert cycle.outcome == "finished"


async def test_a_real_cycle_is_recorded_and_shown(host: Host, bus: PrivateBus) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as vmm:
        session = await vmm.create_session("vm")
        fds = [make_memfd(4096, bytes([i + 1])) for i in range(3)]
        for i, fd in enumerate(fds):
            await session.preserve_fd(f"t{i}", fd)
        await vmm.prepare()
        await vmm.cancel()  # a cancelled cycle first
        await vmm.prepare()
        await vmm.freeze()
        await vmm.reboot()
        assert host.daemons[-1].wait() == 0
        host.start_now()
        back = await vmm.retrieve_session("vm")
        for token in ("t0", "t1"):
            os.close(await back.retrieve_fd(token))
        [cancelled, current] = await vmm.get_history()
        assert cancelled["outcome"] == "cancelled" and cancelled["frozen_usec"] == 0
        assert current["outcome"] == "in progress"
        assert (current["fds_carried"], current["fds_retrieved"]) == (3, 2)
        assert 0 < current["frozen_usec"] <= current["reboot_usec"] <= \
            current["handover_written_usec"] <= current["rebooted_usec"] <= \
            current["first_fd_usec"] <= current["last_fd_usec"]
        await vmm.finish()  # compacts the journal
        host.crash_now()
        history = await vmm.get_history()
        assert [c["outcome"] for c in history] == ["cancelled", "finished"]
        assert history[-1]["ended_by"] == 0 and history[-1]["fds_lost"] == 0
    for fd in fds:
        os.close(fd)
    shown = subprocess.run(
        [sys.executable, "-m", "liveupdated.cli", "--bus", bus.address, "history"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert shown[0].split()[:3] == ["STARTED", "OUTCOME", "BLACKOUT_MS"]
    assert [line.split()[2] for line in shown[1:]] == ["cancelled", "finished"]
    as_json = json.loads(subprocess.run(
        [sys.executable, "-m", "liveupdated.cli", "--bus", bus.address, "history", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout)
    assert as_json[-1]["blackout_ms"] is not None and as_json[-1]["blackout_ms"] >= 0
    assert as_json[-1]["fds_retrieved"] == 2
