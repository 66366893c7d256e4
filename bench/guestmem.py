"""Guest memory for the benchmarks: sparse memfds (or files) with scattered data chunks.

A Layout says where the data chunks of one file lie; written into a memfd and into a file
on /dev/shm it gives liveupdated and `cp` the same bytes to carry, and checks a restored fd.
"""

import functools
import os
import random
from dataclasses import dataclass

from liveupdated.fds import memfd

_DISTINCT_BLOCKS = 8  # random blocks that chunks cycle through: no two neighbours equal


@functools.cache
def _block(chunk: int, index: int) -> bytes:
    return random.Random(f"{chunk}/{index}").randbytes(chunk)


def block_at(chunk: int, offset: int) -> bytes:
    return _block(chunk, (offset // chunk) % _DISTINCT_BLOCKS)


def close_all(fds: list[int]) -> None:
    """Close the fds still open; -1 marks one closed already."""
    for fd in fds:
        if fd >= 0:
            os.close(fd)


@dataclass(frozen=True)
class Layout:
    size: int
    chunk: int
    offsets: tuple[int, ...]

    @classmethod
    def scattered(cls, size: int, chunk: int, count: int, rng: random.Random) -> "Layout":
        """`count` chunks, one at a random aligned place in each of `count` equal slots,
        never touching the next one, so that each chunk is a data extent of its own."""
        slot = size // count
        assert slot >= 2 * chunk, "a slot must hold a chunk and a hole"
        spots = slot // chunk - 1
        return cls(size, chunk, tuple(k * slot + rng.randrange(spots) * chunk
                                      for k in range(count)))

    @property
    def data_bytes(self) -> int:
        return self.chunk * len(self.offsets)

    def write(self, fd: int) -> None:
        os.ftruncate(fd, self.size)
        for offset in self.offsets:
            os.pwrite(fd, block_at(self.chunk, offset), offset)

    def memfd(self, name: str) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.write(fd)
        return fd

    def file(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            self.write(fd)
        finally:
            os.close(fd)

    def matches(self, fd: int) -> bool:
        """Same size and holes, and the first chunk holds the same bytes."""
        first = self.offsets[0]
        return (
            os.fstat(fd).st_size == self.size
            and memfd.data_extents(fd, self.size) == [(o, self.chunk) for o in self.offsets]
            and os.pread(fd, self.chunk, first) == block_at(self.chunk, first)
        )


_POOL = random.Random("small memfds").randbytes(32 << 10)


@dataclass(frozen=True)
class Small:
    """A small memfd, all data, its bytes distinct for each `seed` (the first 8 say it)."""

    seed: int
    size: int  # 8 < size <= 16 KiB

    def content(self) -> bytes:
        start = (self.seed * 4099) % (16 << 10)
        return self.seed.to_bytes(8, "little") + _POOL[start:start + self.size - 8]

    def memfd(self, name: str) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.pwrite(fd, self.content(), 0)
        return fd

    def matches(self, fd: int) -> bool:
        """Byte-exact: the same size and every byte the same."""
        return os.fstat(fd).st_size == self.size and os.pread(fd, self.size + 1, 0) == \
            self.content()
