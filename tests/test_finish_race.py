"""Session.Finish pipelined with Manager.Finish: the backend lets go of each session
once, in order, whatever lands first; nothing is left behind and nothing is handed out
after its release. (The simulated backend here; the fdstore backend's run is in the
nspawn suite, tests/nspawn/test_sid.py, which pipelines the same calls after a real
soft-reboot; the kernel backend's, on the model of LUO, in tests/kernel/test_backend.py.)"""

import asyncio
import os

import pytest

from liveupdated.client import Client
from liveupdated.core.errors import WrongState
from liveupdated.privatebus import PrivateBus
from tests.conftest import Host, make_memfd


@pytest.mark.parametrize("order", ["session first", "manager first", "together"])
async def test_session_finish_pipelined_with_manager_finish(
    host: Host, bus: PrivateBus, order: str
) -> None:
    host.start_now()
    async with await Client.connect(bus.address) as root, \
            await Client.connect(bus.address) as vmm:
        names = [f"vm{n}" for n in range(4)]
        for n, name in enumerate(names):
            session = await vmm.create_session(name)
            for token in ("ram", "state"):
                fd = make_memfd(4096 * (n + 1), f"{name}/{token}".encode(), name=token)
                await session.preserve_fd(token, fd)
                os.close(fd)
        await root.prepare()
        await root.freeze()
        await root.reboot()
        assert host.daemon is not None and host.daemon.wait(60) == 0
        host.start_now()
        sessions = [await vmm.retrieve_session(name) for name in names]
        fd = await sessions[0].retrieve_fd("ram")  # one handed out, the others not
        os.close(fd)
        baseline = host.handover_files()
        assert baseline

        finishes = [s.finish() for s in sessions]
        if order == "session first":
            calls = [*finishes, root.finish()]
        elif order == "manager first":
            calls = [root.finish(), *finishes]
        else:
            calls = [finishes[0], root.finish(), *finishes[1:]]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for outcome in outcomes:  # each answered: done, or refused once the update ended
            assert outcome is None or isinstance(outcome, WrongState), outcome
        assert await root.state() == "normal"
        assert host.handover_files() == []
        assert host.store.store == {}
        assert await vmm.list_sessions() == []
