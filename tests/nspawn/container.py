"""A booted systemd-nspawn container for integration tests, with real reboots.
Commands run inside through nsenter; the console goes to a log file kept for diagnosis."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

REBOOT_EXIT = 133
GUEST_ENV = ("env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin")
# Paths that are fresh mounts inside a booted container: files put there from outside vanish.
VOLATILE_DIRS = frozenset({"tmp", "run", "dev", "proc", "sys"})
_POLL = 0.05
_names = itertools.count()

StrPath = str | os.PathLike[str]
Command = Sequence[str] | str


class ContainerError(RuntimeError):
    """The container failed to boot, stop or run something; carries the console tail."""


class CommandError(ContainerError):
    """A command inside the container exited with a non-zero status."""

    def __init__(self, message: str, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(message)
        self.result = result


class Container:
    """systemd-nspawn booting ``root``, restarted on exit status 133 so reboots are real."""

    def __init__(
        self,
        root: Path,
        binds: Sequence[tuple[StrPath, str]] = (),
        *,
        log_path: Path | None = None,
        machine: str | None = None,
        nspawn_args: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.machine = machine or f"lu-test-{os.getpid()}-{next(_names)}"
        self.log_path = log_path or root.parent / f"{self.machine}.console.log"
        self._argv = [
            "setpriv",
            "--pdeathsig",
            "SIGTERM",
            "--",
            "systemd-nspawn",
            "-D",
            str(root),
            "-b",
            "--register=no",
            "--keep-unit",
            "-q",
            "--console=passive",
            f"--machine={self.machine}",
            *(f"--bind={os.fspath(host)}:{guest}" for host, guest in binds),
            *nspawn_args,
        ]
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._leader: tuple[int, int] | None = None  # (boot number, pid)
        self._boots = 0
        self._exits: list[int] = []
        self._stopping = False
        self._done = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> str:
        """Boot the container and wait until it is running; return the system state."""
        if self._thread is not None:
            raise ContainerError("container already started")
        self._thread = threading.Thread(target=self._supervise, name=self.machine, daemon=True)
        self._thread.start()
        return self.wait_running(timeout)

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the container: orderly if possible, by SIGKILL otherwise. Idempotent."""
        with self._cond:
            self._stopping = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # systemd-nspawn turns SIGTERM into a clean poweroff
            if not self._wait_done(time.monotonic() + timeout):
                self._kill(proc)
        if self._thread is not None:
            self._thread.join()

    def poweroff(self, timeout: float = 30.0) -> None:
        """Power the container off from inside and check that it exits with status 0."""
        with self._cond:
            self._stopping = True
        self.run(["systemctl", "poweroff"], check=False, timeout=timeout)
        if not self._wait_done(time.monotonic() + timeout):
            raise self._error(f"no exit within {timeout}s of systemctl poweroff")
        if self._exits[-1] != 0:
            raise self._error(f"systemd-nspawn exited with {self._exits[-1]} on poweroff")

    def reboot(self, timeout: float = 60.0, *, command: Command = ("systemctl", "reboot")) -> str:
        """Reboot from inside, wait for the new boot to run and return its boot id.

        ``command`` is what reboots the container, run inside (its exit status is not
        checked: it may die with the old boot): e.g. a call that makes a service reboot."""
        deadline = time.monotonic() + timeout
        old_id = self.boot_id()
        with self._cond:
            boots = self._boots
        result = self.run(command, check=False, timeout=timeout)
        with self._cond:
            self._cond.wait_for(
                lambda: self._boots > boots or self._done,
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if self._boots == boots or self._exits[-1] != REBOOT_EXIT:
                raise self._error(
                    f"no reboot (exits {self._exits}); systemctl said: "
                    f"{result.stdout}{result.stderr}"
                )
        self.wait_running(max(0.0, deadline - time.monotonic()))
        new_id = self.boot_id()
        if new_id == old_id:
            raise self._error(f"boot id {new_id} unchanged across reboot")
        return new_id

    def soft_reboot(
        self, timeout: float = 60.0, *, command: Command = ("systemctl", "soft-reboot")
    ) -> int:
        """A soft-reboot from inside (systemd >= 254): the userspace is replaced, the kernel,
        the boot id and systemd-nspawn stay. Waits until the new userspace runs; returns
        the Manager's SoftRebootsCount then, which must have grown."""
        deadline = time.monotonic() + timeout
        before = self.soft_reboots()
        result = self.run(command, check=False, timeout=timeout)
        while True:
            with suppress(ContainerError):
                now = self.soft_reboots()
                if now > before:
                    break
            if time.monotonic() > deadline:
                raise self._error(
                    f"SoftRebootsCount stayed {before}; the command said: "
                    f"{result.stdout}{result.stderr}"
                )
            time.sleep(_POLL)
        self.wait_running(max(0.0, deadline - time.monotonic()))
        return now

    def soft_reboots(self) -> int:
        """org.freedesktop.systemd1.Manager's SoftRebootsCount."""
        out = self.run(["busctl", "--system", "get-property", "org.freedesktop.systemd1",
                        "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                        "SoftRebootsCount"], timeout=10).stdout.split()
        return int(out[1])  # "u 1"

    @property
    def leader(self) -> int:
        """Host PID of the container's systemd (PID 1 inside) in the current boot."""
        return self._current_leader()

    @property
    def boots(self) -> int:
        """Number of times systemd-nspawn was started (1 + completed reboots)."""
        return self._boots

    @property
    def exit_codes(self) -> list[int]:
        """Exit statuses of the systemd-nspawn runs that ended so far."""
        with self._cond:
            return list(self._exits)

    # -- inside the container ----------------------------------------------------------

    def wait_running(self, timeout: float = 60.0) -> str:
        """Wait until ``systemctl is-system-running`` says running or degraded."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            leader = self._wait_leader(deadline)
            with suppress(subprocess.TimeoutExpired):
                state = self._nsenter(
                    leader,
                    ["systemctl", "is-system-running", "--wait"],
                    max(0.1, deadline - time.monotonic()),
                ).stdout.strip()
            if state in ("running", "degraded"):
                return state
            if time.monotonic() > deadline:
                raise self._error(f"not running after {timeout}s (state {state!r})")
            time.sleep(_POLL)  # bus not up yet, or a boot just ended: ask again

    def run(
        self, cmd: Command, *, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd (argv, or a string for ``sh -c``) inside with a clean environment."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        try:
            result = self._nsenter(self._current_leader(), argv, timeout, input)
        except subprocess.TimeoutExpired:
            raise self._error(f"{argv} timed out after {timeout}s") from None
        if check and result.returncode != 0:
            raise CommandError(
                self._message(
                    f"{argv} exited with {result.returncode}\n--- stdout:\n{result.stdout}"
                    f"--- stderr:\n{result.stderr}"
                ),
                result,
            )
        return result

    def run_unit(
        self,
        cmd: Command,
        *,
        check: bool = True,
        timeout: float = 60.0,
        properties: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd as a transient service unit (``systemd-run --wait --pipe``)."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        props = [f"--property={p}" for p in properties]
        return self.run(
            ["systemd-run", "--wait", "--pipe", "-q", "--collect", *props, "--", *argv],
            check=check,
            timeout=timeout,
        )

    def boot_id(self) -> str:
        """The boot id of the running container (new at every boot)."""
        return self.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()

    def copy_in(self, host_path: StrPath, guest_path: str) -> Path:
        """Copy a file or directory into the root; return its path on the host."""
        target = self.host_path(guest_path)
        parts = target.relative_to(self.root).parts
        if parts and parts[0] in VOLATILE_DIRS:
            raise ValueError(f"{guest_path} is a volatile mount inside; use /opt or /var/tmp")
        source = Path(host_path)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        return target

    def host_path(self, guest_path: str) -> Path:
        """Map an absolute guest path to the host, following symlinks within the root."""
        if not guest_path.startswith("/"):
            raise ValueError(f"guest path must be absolute: {guest_path}")
        current = self.root
        pending = [p for p in guest_path.split("/") if p not in ("", ".")]
        for _ in range(1000):
            if not pending:
                return current
            part = pending.pop(0)
            if part == "..":
                current = current.parent if current != self.root else current
                continue
            candidate = current / part
            if candidate.is_symlink():
                link = os.readlink(candidate)
                current = self.root if link.startswith("/") else current
                pending[:0] = [p for p in link.split("/") if p not in ("", ".")]
            else:
                current = candidate
        raise ValueError(f"too many symlinks in {guest_path}")

    def console_tail(self, lines: int = 40) -> str:
        """The last lines of the console log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals --------------------------------------------------------------------

    def _supervise(self) -> None:
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.log_path, "ab", buffering=0) as log:
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    log.write(f"=== boot {self._boots + 1}: {' '.join(self._argv)}\n".encode())
                    try:
                        proc = subprocess.Popen(
                            self._argv,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                            start_new_session=True,
                        )
                    except OSError as exc:
                        log.write(f"=== cannot start: {exc}\n".encode())
                        self._exits.append(-1)
                        break
                    self._proc = proc
                    self._boots += 1
                    self._cond.notify_all()
                code = proc.wait()
                log.write(f"=== systemd-nspawn exited with {code}\n".encode())
                with self._cond:
                    self._exits.append(code)
                    self._proc = None
                    self._cond.notify_all()
                    if code != REBOOT_EXIT:
                        break
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _wait_done(self, deadline: float) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self._done, timeout=max(0.0, deadline - time.monotonic())
            )

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        # Killing PID 1 of the container's namespace kills every process inside it;
        # systemd-nspawn alone may die and leave the container running.
        with self._cond:
            cached = self._leader[1] if self._leader else None
        leaders = {pid for pid in (cached, _find_leader(proc.pid)) if pid and _is_init(pid)}
        for pid in leaders:
            _signal(pid, signal.SIGKILL)
        _signal(-proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        self._wait_done(deadline)
        while any(_is_alive(pid) for pid in leaders) and time.monotonic() < deadline:
            time.sleep(_POLL)  # SIGKILL is asynchronous; wait for the kernel to finish
        # What systemd-nspawn removes itself on a clean exit.
        with suppress(OSError):
            os.rmdir(f"/run/systemd/nspawn/propagate/{self.machine}")
        with suppress(OSError):
            st = os.stat(self.root)
            os.unlink(f"/run/systemd/nspawn/locks/inode-{st.st_dev}:{st.st_ino}")

    def _current_leader(self) -> int:
        with self._cond:
            proc, boot, leader = self._proc, self._boots, self._leader
        if proc is None:
            raise self._error("container is not running")
        if leader is not None and leader[0] == boot:
            return leader[1]
        pid = _find_leader(proc.pid)
        if pid is None:
            raise self._error("container has no init process yet")
        with self._cond:
            self._leader = (boot, pid)
        return pid

    def _wait_leader(self, deadline: float) -> int:
        while True:
            with self._cond:
                if self._done:
                    raise self._error(f"systemd-nspawn exited with {self._exits}")
                running = self._proc is not None
            if running:
                try:
                    return self._current_leader()
                except ContainerError:
                    pass
            if time.monotonic() > deadline:
                raise self._error("timed out waiting for the container's init process")
            time.sleep(_POLL)  # no event tells when nspawn's child has exec'd systemd

    def _nsenter(
        self, leader: int, argv: list[str], timeout: float, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        full = ["nsenter", "-t", str(leader), "-a", *GUEST_ENV, *argv]
        with subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal(-proc.pid, signal.SIGKILL)
                proc.communicate()
                raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def _message(self, text: str) -> str:
        return f"{text}\n--- console tail ({self.log_path}):\n{self.console_tail()}"

    def _error(self, text: str) -> ContainerError:
        return ContainerError(self._message(text))


class ContainerFactory(Protocol):
    """Signature of the ``container`` fixture: builds (and by default boots) a container."""

    def __call__(
        self,
        binds: Sequence[tuple[StrPath, str]] = (),
        *,
        boot: bool = True,
        timeout: float = 60.0,
        nspawn_args: Sequence[str] = (),
    ) -> Container: ...


@contextmanager
def overlay_root(lower: Path, scratch: Path) -> Iterator[Path]:
    """Mount a writable overlay of ``lower`` under ``scratch``; yield the merged root."""
    upper, work, merged = (scratch / name for name in ("upper", "work", "merged"))
    for path in (upper, work, merged):
        path.mkdir(parents=True)
    mount = subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lower},upperdir={upper},workdir={work}",
            str(merged),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        raise ContainerError(f"cannot mount an overlay root: {mount.stderr.strip()}")
    try:
        yield merged
    finally:
        umount = subprocess.run(["umount", str(merged)], check=False, capture_output=True)
        if umount.returncode != 0:
            subprocess.run(["umount", "--lazy", str(merged)], check=True)


def _find_leader(nspawn_pid: int) -> int | None:
    """The container's systemd: a child of systemd-nspawn that is PID 1 in its namespace."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _status(int(entry.name)).get("PPid") == str(nspawn_pid):
            pid = int(entry.name)
            if _is_init(pid):
                return pid
    return None


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _is_init(pid: int) -> bool:
    status = _status(pid)
    return status.get("Name") == "systemd" and status.get("NSpid", "").split()[-1:] == ["1"]


def _is_alive(pid: int) -> bool:
    state = _status(pid).get("State", "Z")
    return not state.startswith(("Z", "X"))


def _signal(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)
