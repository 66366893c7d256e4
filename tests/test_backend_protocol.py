"""The Backend protocol is complete: every backend defines every member, so the daemon
asks a backend what it does (restores ahead, kexecs in process, adopts, has a handover
area) instead of probing it with getattr or switching on its name."""

import inspect
from pathlib import Path
from typing import get_type_hints

import pytest

from liveupdated.backends import Backend
from liveupdated.backends.fdstore import FdStoreBackend
from liveupdated.backends.kernel import KernelBackend
from liveupdated.backends.simulated import SimulatedBackend
from liveupdated.core import preflight
from liveupdated.daemon import reboots_in_process

BACKENDS = (SimulatedBackend, KernelBackend, FdStoreBackend)


def protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(value) for name, value in vars(Backend).items()
            if callable(value) and not name.startswith("_")}


def gaps(cls: type) -> list[str]:
    """What `cls` lacks of the protocol: a missing member, a data member whose class
    attribute is not of the declared type, a method whose parameters differ."""
    found = []
    for name, hint in get_type_hints(Backend).items():
        if not hasattr(cls, name):
            found.append(f"{name}: missing")
        elif not isinstance(getattr(cls, name), hint):
            found.append(f"{name}: {getattr(cls, name)!r} is not a {hint.__name__}")
    for name, wanted in protocol_methods().items():
        method = getattr(cls, name, None)
        if not callable(method):
            found.append(f"{name}(): missing")
        elif list(inspect.signature(method).parameters) != list(wanted.parameters):
            found.append(f"{name}(): parameters {inspect.signature(method)} not {wanted}")
    return found


def test_the_protocol_declares_what_the_daemon_used_to_probe_for() -> None:
    hints = get_type_hints(Backend)
    assert {name: hints[name] for name in (
        "name", "keeps_fd_store", "restores_ahead", "kexec_in_process", "stores_own_fds")} \
        == {"name": str, "keeps_fd_store": bool, "restores_ahead": bool,
            "kexec_in_process": bool, "stores_own_fds": bool}
    assert {"adopt", "handover_area"} <= set(protocol_methods())


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda cls: cls.name)
def test_every_backend_defines_every_member_of_the_protocol(cls: type) -> None:
    assert gaps(cls) == []


def test_a_backend_lacking_a_member_is_caught() -> None:
    class Partial(SimulatedBackend):
        restores_ahead = "yes"  # type: ignore[assignment]
        adopt = None  # type: ignore[assignment]

        def finish_session(self, session: str) -> None:  # type: ignore[override]
            pass

    assert sorted(gaps(Partial)) == [
        "adopt(): missing",
        "finish_session(): parameters (self, session: str) -> None not "
        "(self, session: str, released: collections.abc.Sequence[str]) -> None",
        "restores_ahead: 'yes' is not a bool",
    ]


def test_what_each_backend_says_of_itself_is_what_the_daemon_relied_on() -> None:
    """The values the names used to decide: only the simulated backend copies data (and
    restores ahead); only the kernel's kexec is the daemon's syscall and only it keeps
    fds of its own in the store; only fdstore's fds come back in the store."""
    said = {cls.name: (cls.restores_ahead, cls.kexec_in_process, cls.stores_own_fds,
                       cls.keeps_fd_store) for cls in BACKENDS}
    assert said == {
        "simulated": (True, False, False, False),
        "kernel": (False, True, True, False),
        "fdstore": (False, False, False, True),
    }


def test_only_the_simulated_backend_has_a_handover_area(tmp_path: Path) -> None:
    assert SimulatedBackend(tmp_path).handover_area() == tmp_path
    assert FdStoreBackend().handover_area() is None
    # KernelBackend opens /dev/liveupdate when built: its method is called unbound.
    assert KernelBackend.handover_area(object()) is None  # type: ignore[arg-type]


def test_check_asks_for_free_room_where_the_handover_is_written(tmp_path: Path) -> None:
    simulated = preflight.gather(SimulatedBackend(tmp_path / "area"), "exit", {}, id)
    assert simulated.backend == "simulated"
    assert simulated.free_bytes is not None and simulated.free_bytes > 0
    fdstore = preflight.gather(FdStoreBackend(), "exit", {}, id)
    assert (fdstore.backend, fdstore.free_bytes) == ("fdstore", None)


def test_a_backend_whose_fds_never_come_back_in_the_store_refuses_to_adopt(
        tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="simulated backend adopts no fd"):
        SimulatedBackend(tmp_path).adopt(("vm", "ram"), -1)


@pytest.mark.parametrize(("action", "backend", "in_process"), [
    ("exit", SimulatedBackend, True),
    ("exit", FdStoreBackend, True),
    ("kexec", KernelBackend, True),
    ("kexec", FdStoreBackend, False),
    ("kexec", SimulatedBackend, False),
    ("systemctl kexec", KernelBackend, False),
    ("soft-reboot", FdStoreBackend, False),
])
def test_the_reboot_is_the_daemons_own_for_an_exit_or_a_kexec_it_makes_itself(
        action: str, backend: type[Backend], in_process: bool) -> None:
    # Only the class's kexec_in_process is read: the class stands for the backend.
    assert reboots_in_process(action, backend) is in_process  # type: ignore[arg-type]
