"""The fds the daemon holds, keyed by (session, token), mirrored into systemd's fd store.

Every fd the daemon keeps goes through here, so that a restart or crash of the daemon
gets each one back from the store; nothing else closes a held fd.
"""

import fcntl
import os

import structlog

from liveupdated.backends import Key
from liveupdated.systemd import Notifier, fd_name

log = structlog.get_logger("liveupdated")


class Vault:
    def __init__(self, notifier: Notifier) -> None:
        self._fds: dict[Key, int] = {}
        self._files: dict[Key, tuple[int, int]] = {}  # (st_dev, st_ino) of each held fd
        self._holders: dict[tuple[int, int], int] = {}  # how many keys hold each file
        self._unindexed: set[Key] = set()  # kept from the fd store, not yet in _files
        # The old boot's own fds after the reboot, whose content the handover carries:
        # never handed out, closed once their session's Finish is durable.
        self._spares: dict[Key, list[int]] = {}
        self._notifier = notifier

    def __contains__(self, key: Key) -> bool:
        return key in self._fds

    def get(self, key: Key) -> int:
        return self._fds[key]

    def items(self) -> dict[Key, int]:
        return dict(self._fds)

    def keep(self, key: Key, fd: int, *, store: bool = True) -> None:
        """Take ownership of `fd`; `store=False` when it came from the fd store already
        (close-on-exec since take_listen_fds, and indexed by file only when a new fd needs
        the index, so that a restart with thousands of fds does not stat each of them)."""
        self._fds[key] = fd
        if not store:
            self._unindexed.add(key)
            return
        os.set_inheritable(fd, False)
        for old in self._unindexed:
            self._index(old, self._fds[old])
        self._unindexed.clear()
        if self._index(key, fd) == 1:
            self._notifier.store_fd(fd_name(*key), fd)
            return
        # systemd keeps one fd per open file description and silently drops the others
        # (same_fd()), so a second key of the same memfd is stored as its own opening.
        self._store_reopened(key, fd)

    def keep_renamed(self, key: Key, fd: int) -> None:
        """Take ownership of an fd from the store under another name than it came with:
        stored anew (as a new opening of the file: systemd keeps one entry per open file
        description, and the old name's entry goes only when recovery drops that name)."""
        self._fds[key] = fd
        os.set_inheritable(fd, False)
        self._index(key, fd)
        self._store_reopened(key, fd)

    def keep_spare(self, key: Key, fd: int) -> None:
        self._spares.setdefault(key, []).append(fd)

    def release_spares(self, session: str | None = None) -> None:
        """Close the spares of `session` (every spare if None): its Finish is durable."""
        for key in [k for k in self._spares if session is None or k[0] == session]:
            for fd in self._spares.pop(key):
                os.close(fd)
            if key not in self._fds:  # else its name goes when the held fd is released
                self._notifier.remove_fd(fd_name(*key))

    def _store_reopened(self, key: Key, fd: int) -> None:
        try:
            reopened = os.open(f"/proc/self/fd/{fd}", _access_mode(fd) | os.O_CLOEXEC)
        except OSError as exc:  # as for any fd store failure: held, not stored
            log.warning("fd_store_failed", fdname=fd_name(*key), error=exc.strerror)
            return
        try:
            os.lseek(reopened, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
            self._notifier.store_fd(fd_name(*key), reopened)
        finally:
            os.close(reopened)

    def _index(self, key: Key, fd: int) -> int:
        """Record which file `fd` is; how many held keys now hold that file."""
        st = os.fstat(fd)
        file = self._files[key] = (st.st_dev, st.st_ino)
        self._holders[file] = self._holders.get(file, 0) + 1
        return self._holders[file]

    def dup(self, key: Key) -> int:
        return os.dup(self._fds[key])

    def release(self, key: Key) -> None:
        fd = self.take(key)
        if fd is not None:
            os.close(fd)

    def take(self, key: Key) -> int | None:
        """Let go of `key` in the fd store at once, but hand its fd to the caller instead
        of closing it (None if not held): a release not yet durable may be undone."""
        fd = self._fds.pop(key, None)
        if fd is None:
            return None
        self._unindexed.discard(key)
        file = self._files.pop(key, None)
        if file is not None:
            self._holders[file] -= 1
            if not self._holders[file]:
                del self._holders[file]
        self._notifier.remove_fd(fd_name(*key))
        return fd

    def forget_stored(self, name: str) -> None:
        """Drop `name` from the fd store (its fds are held under other names now)."""
        self._notifier.remove_fd(name)

    def refuse(self, name: str, fd: int) -> None:
        """An fd from the store that is not ours (any more): close it, drop it from the store."""
        self._notifier.remove_fd(name)
        os.close(fd)


def _access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
