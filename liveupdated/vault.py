"""The fds the daemon holds, keyed by (session, token), mirrored into systemd's fd store.

Every fd the daemon keeps goes through here, so that a restart or crash of the daemon
gets each one back from the store; nothing else closes a held fd.
"""

import fcntl
import os

from liveupdated.backends import Key
from liveupdated.systemd import Notifier, fd_name


class Vault:
    def __init__(self, notifier: Notifier) -> None:
        self._fds: dict[Key, int] = {}
        self._files: dict[Key, tuple[int, int]] = {}  # (st_dev, st_ino) of each held fd
        self._holders: dict[tuple[int, int], int] = {}  # how many keys hold each file
        self._notifier = notifier

    def __contains__(self, key: Key) -> bool:
        return key in self._fds

    def get(self, key: Key) -> int:
        return self._fds[key]

    def items(self) -> dict[Key, int]:
        return dict(self._fds)

    def keep(self, key: Key, fd: int, *, store: bool = True) -> None:
        """Take ownership of `fd`; `store=False` when it came from the fd store already."""
        os.set_inheritable(fd, False)
        st = os.fstat(fd)
        file = (st.st_dev, st.st_ino)
        held_already = self._holders.get(file, 0) > 0
        self._fds[key] = fd
        self._files[key] = file
        self._holders[file] = self._holders.get(file, 0) + 1
        if not store:
            return
        if not held_already:
            self._notifier.store_fd(fd_name(*key), fd)
            return
        # systemd keeps one fd per open file description and silently drops the others
        # (same_fd()), so a second key of the same memfd is stored as its own opening.
        reopened = os.open(f"/proc/self/fd/{fd}", _access_mode(fd) | os.O_CLOEXEC)
        try:
            self._notifier.store_fd(fd_name(*key), reopened)
        finally:
            os.close(reopened)

    def dup(self, key: Key) -> int:
        return os.dup(self._fds[key])

    def release(self, key: Key) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            file = self._files.pop(key)
            self._holders[file] -= 1
            if not self._holders[file]:
                del self._holders[file]
            self._notifier.remove_fd(fd_name(*key))
            os.close(fd)

    def refuse(self, name: str, fd: int) -> None:
        """An fd from the store that is not ours (any more): close it, drop it from the store."""
        self._notifier.remove_fd(name)
        os.close(fd)


def _access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
