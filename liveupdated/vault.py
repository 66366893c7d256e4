"""The fds the daemon holds, keyed by (session, token), mirrored into systemd's fd store.

Every fd the daemon keeps goes through here, so that a restart or crash of the daemon
gets each one back from the store; nothing else closes a held fd.
"""

import os

from liveupdated.backends import Key
from liveupdated.systemd import Notifier, fd_name


class Vault:
    def __init__(self, notifier: Notifier) -> None:
        self._fds: dict[Key, int] = {}
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
        self._fds[key] = fd
        if store:
            self._notifier.store_fd(fd_name(*key), fd)

    def dup(self, key: Key) -> int:
        return os.dup(self._fds[key])

    def release(self, key: Key) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            self._notifier.remove_fd(fd_name(*key))
            os.close(fd)

    def refuse(self, name: str, fd: int) -> None:
        """An fd from the store that is not ours (any more): close it, drop it from the store."""
        self._notifier.remove_fd(name)
        os.close(fd)
