"""Start-up refusals of a configuration the daemon cannot serve, and of a second daemon on
a bus where org.liveupdate1 is taken: one line and the status the unit knows (78 is
never restarted, 75 is), unless fds are held, when the fds come first."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated.bus import BUS_NAME
from liveupdated.config import LUO_DEVICE
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess, Notifications
from liveupdated.statedir import EXIT_CONFIG, EXIT_TEMPFAIL
from tests.test_environment import NO_BUS, one_line, restart_prevented, run_daemon


def log_events(path: Path) -> list[dict[str, object]]:
    """The JSON log lines the daemon wrote (a `<N>` priority prefix taken off)."""
    events = []
    for line in path.read_text().splitlines():
        text = line.partition(">")[2] if line.startswith("<") else line
        if text.startswith("{"):
            events.append(json.loads(text))
    return events


@pytest.fixture
def held_store(bus: PrivateBus, tmp_path: Path) -> Iterator[Notifications]:
    """An fd store holding what a daemon put there (its journal's watermark): the next
    start is given it in LISTEN_FDS, as systemd gives a restarted unit its store."""
    store = Notifications()
    first = DaemonProcess(bus.address, tmp_path / "state", "--backend", "simulated",
                          notifications=store).start()
    try:
        assert first.stop() == 0
        assert store.stored(), "the first daemon stored nothing: no fds would be held"
        yield store
    finally:
        store.close()


@pytest.mark.skipif(os.path.exists(LUO_DEVICE), reason="this host has /dev/liveupdate")
def test_the_kernel_backend_without_its_device_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    result = run_daemon("--bus", NO_BUS, "--state-dir", str(tmp_path / "s"),
                        "--backend", "kernel")
    line = one_line(result, EXIT_CONFIG)
    assert "--backend kernel: no /dev/liveupdate" in line
    assert EXIT_CONFIG in restart_prevented()  # no restart loop for a configuration error
    assert not (tmp_path / "s").exists()  # refused before anything was created


def test_the_fdstore_backend_outside_systemd_is_a_configuration_error(tmp_path: Path) -> None:
    # run_daemon drops INVOCATION_ID: not started by systemd, whatever PID 1 is.
    result = run_daemon("--bus", NO_BUS, "--state-dir", str(tmp_path / "s"),
                        "--backend", "fdstore")
    line = one_line(result, EXIT_CONFIG)
    assert "--backend fdstore: not started by systemd" in line


def test_auto_is_never_refused_for_its_backend(tmp_path: Path) -> None:
    """auto picks what the host can serve: here it gets as far as the missing bus."""
    result = run_daemon("--bus", NO_BUS, "--state-dir", str(tmp_path / "s"),
                        "--backend", "auto")
    line = one_line(result, 69)
    assert "no D-Bus at" in line


def test_with_fds_held_the_fdstore_backend_starts_anyway_and_says_so(
    bus: PrivateBus, tmp_path: Path, held_store: Notifications
) -> None:
    """A unit that stops for good may lose its store: the daemon serves on, critical."""
    log = tmp_path / "log"
    with log.open("wb") as out, DaemonProcess(
        bus.address, tmp_path / "state", "--backend", "fdstore", log=out,
        notifications=held_store,
    ) as daemon:  # started: READY=1 came
        assert daemon.process is not None and daemon.process.poll() is None
        assert daemon.stop() == 0
    critical = [e for e in log_events(log) if e.get("event") == "backend_unavailable"]
    assert len(critical) == 1, log.read_text()
    assert critical[0]["level"] == "critical"
    assert "--backend fdstore: not started by systemd" in str(critical[0]["problem"])


@pytest.mark.skipif(os.path.exists(LUO_DEVICE), reason="this host has /dev/liveupdate")
def test_with_fds_held_the_kernel_backend_exits_for_a_restart_not_for_good(
    bus: PrivateBus, tmp_path: Path, held_store: Notifications
) -> None:
    """No device to serve with: exit 1, which the unit restarts with its fd store."""
    log = tmp_path / "log"
    with log.open("wb") as out:
        daemon = DaemonProcess(bus.address, tmp_path / "state", "--backend", "kernel",
                               log=out, notifications=held_store)
        with pytest.raises(RuntimeError, match="exited 1 before READY=1"):
            daemon.start()
        daemon.close()
    assert 1 not in restart_prevented()
    events = [e.get("event") for e in log_events(log)]
    assert "backend_unavailable" in events, log.read_text()
    assert held_store.stored(), "the store was emptied: a restart would find nothing"


def test_a_second_daemon_on_a_bus_where_the_name_is_taken_names_the_owner(
    bus: PrivateBus, daemon: DaemonProcess, tmp_path: Path
) -> None:
    second = run_daemon("--bus", bus.address, "--state-dir", str(tmp_path / "other"))
    line = one_line(second, EXIT_TEMPFAIL)
    assert f"{BUS_NAME} is already owned on this bus (pid {daemon.pid}," in line, line
    assert EXIT_TEMPFAIL not in restart_prevented()
    assert daemon.process is not None and daemon.process.poll() is None  # untouched
