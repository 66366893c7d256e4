"""Start-up in a bad environment: one line and an exit status the unit knows, never a
traceback; the state dir checked, created 0700 and locked for one daemon."""

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated import durable
from liveupdated.config import Config, parse_args
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from liveupdated.statedir import (
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    StateDirError,
    open_state,
    startup_failure,
)

UNIT = Path(__file__).resolve().parent.parent / "units" / "liveupdated.service"
NO_BUS = "unix:path=/nonexistent/bus"
NOBODY = 65534


def run_daemon(
    *args: str, env: dict[str, str] | None = None, umask: int = -1
) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **(env or {})}
    environ.pop("INVOCATION_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "liveupdated.daemon", "--backend", "simulated",
         "--reboot-action", "exit", *args],
        capture_output=True, text=True, timeout=60, env=environ, stdin=subprocess.DEVNULL,
        check=False, umask=umask,
    )


def one_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The run exited `status`, saying why in a single stderr line; that line."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == status, result.stderr
    return lines[0]


def restart_prevented() -> set[int]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("RestartPreventExitStatus="):
            return {int(word) for word in line.partition("=")[2].split()}
    return set()


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """An existing state dir of ours, bind-mounted read-only over itself."""
    path = tmp_path / "ro-state"
    path.mkdir(mode=0o700)
    (path / "lock").write_bytes(b"")
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs with not a byte left."""
    path = tmp_path / "full"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        with (path / "filler").open("wb") as filler:
            with pytest.raises(OSError) as full:
                while True:
                    filler.write(b"x" * 65536)
                    filler.flush()
            assert full.value.errno == errno.ENOSPC
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--bus", "nonsense", "--state-dir", "/tmp/x"],
    ["--bus", NO_BUS],  # an address needs its own state dir
    ["--bus", NO_BUS, "--state-dir", "/tmp/x", "--freeze-timeout", "0"],
    ["--bus", NO_BUS, "--state-dir", "/tmp/x", "--freeze-timeout", "-1"],
    ["--bus", NO_BUS, "--state-dir", "/tmp/x", "--freeze-timeout", "nan"],
    ["--bus", NO_BUS, "--state-dir", "/tmp/x", "--max-sessions", "0"],
    ["--bus", NO_BUS, "--state-dir", "/tmp/x", "--max-fds-per-session", "0"],
    ["--bus", NO_BUS, "--state-dir", "/tmp/x", "--max-sessions-per-uid", "-3"],
    ["--bus", NO_BUS, "--state-dir", "/tmp/x", "--max-preserved-bytes", "0"],
])
def test_a_bad_command_line_is_a_one_line_usage_error(args: list[str]) -> None:
    line = one_line(run_daemon(*args), EXIT_USAGE)
    assert line.startswith("liveupdated: error: ")


def test_state_dir_defaults_by_bus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert parse_args(["--bus", "system"]).state_dir == Path("/var/lib/liveupdated")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert parse_args(["--bus", "session"]).state_dir == tmp_path / "xdg" / "liveupdated"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse_args(["--bus", "session"]).state_dir == (
        tmp_path / "home" / ".local" / "state" / "liveupdated"
    )
    config = parse_args(["--bus", NO_BUS, "--state-dir", str(tmp_path), "--freeze-timeout",
                         "0.5", "--max-sessions", "1"])
    assert (config.state_dir, config.freeze_timeout, config.max_sessions) == (tmp_path, 0.5, 1)


def test_the_unit_prevents_restarts_for_permanent_failures_only() -> None:
    assert restart_prevented() == {EXIT_USAGE, EXIT_CANTCREAT, EXIT_CONFIG}
    for retried in (1, EXIT_UNAVAILABLE, EXIT_TEMPFAIL):  # may pass; fd store kept
        assert retried not in restart_prevented()


# -- the state dir and the handover area ---------------------------------------------------


def test_a_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    line = one_line(run_daemon("--bus", NO_BUS, "--state-dir", str(tmp_path / "file")),
                    EXIT_CONFIG)
    assert f"state dir {tmp_path / 'file'} is not a directory" in line


@pytest.mark.parametrize("path", ["/proc/liveupdated", "/proc", "/sys/kernel/liveupdated"])
def test_a_state_dir_under_proc_is_refused(path: str) -> None:
    line = one_line(run_daemon("--bus", NO_BUS, "--state-dir", path), EXIT_CONFIG)
    assert "pseudo file system" in line


@pytest.mark.parametrize("which", ["state", "handover"])
@pytest.mark.parametrize("unsafe", ["symlink", "other uid", "0770", "0702", "file"])
def test_an_unsafe_directory_is_refused(tmp_path: Path, which: str, unsafe: str) -> None:
    state, handover = tmp_path / "state", tmp_path / "handover"
    target = state if which == "state" else handover
    if unsafe == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        target.symlink_to(tmp_path / "real")
    elif unsafe == "file":
        target.write_text("")
    else:
        target.mkdir(mode=0o700)
        if unsafe == "other uid":
            os.chown(target, NOBODY, NOBODY)
        else:
            os.chmod(target, int(unsafe, 8))
    result = run_daemon("--bus", NO_BUS, "--state-dir", str(state),
                        "--handover-dir", str(handover))
    line = one_line(result, EXIT_CONFIG)
    what = "state dir" if which == "state" else "handover area"
    assert f"{what} {target} " in line
    assert {"symlink": "is a symlink", "other uid": f"owned by uid {NOBODY}",
            "0770": "writable by others (mode 0770)", "0702": "writable by others",
            "file": "is not a directory"}[unsafe] in line
    assert not (tmp_path / "real" / "lock").exists()  # nothing written through the link


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_directories_are_created_0700_under_parents_0755(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "a" / "b" / "state"
    handover = tmp_path / "elsewhere" / "handover"
    result = run_daemon("--bus", NO_BUS, "--state-dir", str(state),
                        "--handover-dir", str(handover), umask=umask)
    one_line(result, EXIT_UNAVAILABLE)  # got past the directories, to the bus
    for path in (state, handover, state / "handover"):
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert handover.is_dir() and not (state / "handover").exists()
    for parent in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "elsewhere"):
        assert stat.S_IMODE(parent.stat().st_mode) == 0o755 & ~umask, parent


def test_a_read_only_state_dir_stops_the_start(read_only: Path) -> None:
    line = one_line(run_daemon("--bus", NO_BUS, "--state-dir", str(read_only)),
                    EXIT_CANTCREAT)
    assert f"state dir {read_only}: Read-only file system (EROFS)" in line


def test_a_read_only_handover_area_stops_the_start(tmp_path: Path, read_only: Path) -> None:
    line = one_line(run_daemon("--bus", NO_BUS, "--state-dir", str(tmp_path / "state"),
                               "--handover-dir", str(read_only / "handover")),
                    EXIT_CANTCREAT)
    assert f"handover area {read_only / 'handover'}: Read-only file system (EROFS)" in line


def test_a_full_state_dir_stops_the_start(full_disk: Path) -> None:
    line = one_line(run_daemon("--bus", NO_BUS, "--state-dir", str(full_disk / "state")),
                    EXIT_CANTCREAT)
    assert "No space left on device (ENOSPC)" in line


# -- the bus -----------------------------------------------------------------------------


def test_no_bus_at_the_address(tmp_path: Path) -> None:
    line = one_line(run_daemon("--bus", NO_BUS, "--state-dir", str(tmp_path / "s")),
                    EXIT_UNAVAILABLE)
    assert f"no D-Bus at '{NO_BUS}': No such file or directory (ENOENT)" in line


def test_no_system_bus(tmp_path: Path) -> None:
    result = run_daemon("--bus", "system", "--state-dir", str(tmp_path / "s"),
                        env={"DBUS_SYSTEM_BUS_ADDRESS": NO_BUS})
    assert "no D-Bus at 'system'" in one_line(result, EXIT_UNAVAILABLE)


def test_an_address_dbus_cannot_use_is_a_configuration_error(tmp_path: Path) -> None:
    line = one_line(run_daemon("--bus", "unix:nopath=1", "--state-dir", str(tmp_path / "s")),
                    EXIT_CONFIG)
    assert "bus address 'unix:nopath=1'" in line


# -- one daemon per state dir ----------------------------------------------------------------


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(
    bus: PrivateBus, state_dir: Path, daemon: DaemonProcess, tmp_path: Path
) -> None:
    assert (state_dir / "lock").read_text() == f"{daemon.pid}\n"
    second = run_daemon("--bus", bus.address, "--state-dir", str(state_dir))
    line = one_line(second, EXIT_TEMPFAIL)
    assert f"another liveupdated (pid {daemon.pid}) holds {state_dir}" in line
    # The same journal under another bus or handover area is no way around it.
    other = run_daemon("--bus", NO_BUS, "--state-dir", str(state_dir),
                       "--handover-dir", str(tmp_path / "h2"))
    assert f"(pid {daemon.pid})" in one_line(other, EXIT_TEMPFAIL)
    assert daemon.process is not None and daemon.process.poll() is None
    # The lock's fd is close-on-exec and never offered to the fd store.
    lock_fds = [fd for fd in os.listdir(f"/proc/{daemon.pid}/fd")
                if os.readlink(f"/proc/{daemon.pid}/fd/{fd}") == str(state_dir / "lock")]
    assert len(lock_fds) == 1
    flags = Path(f"/proc/{daemon.pid}/fdinfo/{lock_fds[0]}").read_text().split()
    assert int(flags[flags.index("flags:") + 1], 8) & os.O_CLOEXEC
    stored = [os.readlink(f"/proc/self/fd/{fd}") for fd in daemon.notifications.store.values()]
    assert str(state_dir / "lock") not in stored
    daemon.stop()
    DaemonProcess(bus.address, state_dir, "--backend", "simulated").start().close()


# -- statedir, in process -------------------------------------------------------------------


def test_open_state_locks_once_per_dir(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path / "s", backend="simulated")
    state = open_state(config)
    try:
        assert state.writable and state.problem == ""
        assert state.handover == tmp_path / "s" / "handover"
        with pytest.raises(StateDirError) as second:
            open_state(config)
        assert second.value.exit_status == EXIT_TEMPFAIL
        assert second.value.message == (
            f"another liveupdated (pid {os.getpid()}) holds {config.state_dir}"
        )
    finally:
        state.close()
    open_state(config).close()  # released


def test_a_planted_lock_symlink_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (state / "lock").symlink_to(victim)
    with pytest.raises(StateDirError) as refused:
        open_state(Config(state_dir=state, backend="simulated"))
    assert refused.value.exit_status == EXIT_CONFIG
    assert victim.read_text() == "precious"


def test_with_fds_held_a_read_only_state_dir_is_degraded_not_fatal(
    read_only: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = Config(state_dir=read_only, backend="simulated")
    with pytest.raises(StateDirError) as fatal:
        open_state(config)
    assert fatal.value.exit_status == EXIT_CANTCREAT
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    state = open_state(config)
    try:
        assert not state.writable and state.holds_fds
        assert "Read-only file system (EROFS)" in state.problem
        assert state.lock_fd >= 0  # the lock is still taken, read-only
        with pytest.raises(StateDirError) as second:
            open_state(config)
        assert second.value.exit_status == EXIT_TEMPFAIL
    finally:
        state.close()
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))  # another process's fds
    with pytest.raises(StateDirError):
        open_state(config)


def test_startup_failure_keeps_a_unit_with_fds_restartable() -> None:
    config = Config(state_dir=Path("/x"))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/journal")
    assert startup_failure(full, config, holds_fds=False).exit_status == EXIT_CANTCREAT
    held = startup_failure(full, config, holds_fds=True)
    assert held.exit_status == EXIT_TEMPFAIL and held.exit_status not in restart_prevented()
    assert held.message == "/x/journal: No space left on device (ENOSPC)"
    assert startup_failure(RuntimeError("boom"), config, False).exit_status == 1
    assert durable.describe(OSError(errno.EIO, "Input/output error")) == (
        "Input/output error (EIO)"
    )
