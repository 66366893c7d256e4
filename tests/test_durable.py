"""The durable primitives, and the crash hook that kills a run at any one of its points."""

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from liveupdated import durable

ROOT = Path(__file__).resolve().parents[1]


def points_passed(action: Callable[[], object]) -> Counter[str]:
    """The points `action` passes, by name."""
    before = Counter(durable.counts)
    action()
    return Counter(durable.counts) - before


def test_create_new_file_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        durable.create_new_file(path)
    assert path.read_bytes() == b"old"


def test_create_new_file_refuses_a_symlink_even_a_dangling_one(tmp_path: Path) -> None:
    target = tmp_path / "target"
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        durable.create_new_file(link)
    assert not target.exists()  # nothing created through the link


def test_create_new_file_makes_a_private_file(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        fd = durable.create_new_file(tmp_path / "f")
    finally:
        os.umask(old)
    try:
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        assert os.get_inheritable(fd) is False  # O_CLOEXEC
    finally:
        os.close(fd)


def test_write_new_file_holds_the_data_and_passes_its_points(tmp_path: Path) -> None:
    path = tmp_path / "f"
    passed = points_passed(lambda: durable.write_new_file(path, b"evidence"))
    assert path.read_bytes() == b"evidence"
    assert passed == Counter({"new file write": 1, "new file fsync": 1, "directory fsync": 1})
    with pytest.raises(FileExistsError):
        durable.write_new_file(path, b"other")
    assert path.read_bytes() == b"evidence"


def test_write_atomically_replaces_the_content_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    (tmp_path / "f.new").write_bytes(b"stale, from a crash")
    passed = points_passed(lambda: durable.write_atomically(path, b"new"))
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f"]
    assert passed == Counter({"atomic write": 1, "atomic fsync": 1, "atomic rename": 1,
                              "directory fsync": 1})


def test_write_atomically_does_not_write_through_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not ours")
    (tmp_path / "f.new").symlink_to(elsewhere)
    with pytest.raises(OSError):
        durable.write_atomically(path, b"new")
    assert (path.read_bytes(), elsewhere.read_bytes()) == (b"old", b"not ours")


def test_append_and_sync_appends_and_passes_its_points(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"head:")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        passed = points_passed(lambda: durable.append_and_sync(fd, b"tail"))
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head:tail"
    assert passed == Counter({"append write": 1, "append fdatasync": 1})


def test_point_counts_calls_by_name() -> None:
    def three() -> None:
        durable.point("a")
        durable.point("b")
        durable.point("a")

    assert points_passed(three) == Counter({"a": 2, "b": 1})


# The script a crashed run runs: three atomic replacements of one file.
WRITER = """
import sys
from pathlib import Path
from liveupdated.durable import write_atomically
path = Path(sys.argv[1])
for version in (b"v1" * 1000, b"v2" * 2000, b"v3" * 10):
    write_atomically(path, version)
"""
VERSIONS = [b"v0", b"v1" * 1000, b"v2" * 2000, b"v3" * 10]


def run_writer(tmp_path: Path, crash_at: int | None) -> tuple[int, list[str], bytes]:
    """Run WRITER on a file holding VERSIONS[0]: its exit status, the points it passed
    (in order) and what the file holds after it."""
    path, log = tmp_path / "file", tmp_path / "points"
    path.write_bytes(VERSIONS[0])
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), durable.POINTS_LOG_ENV: str(log)}
    env.pop(durable.CRASH_AT_POINT_ENV, None)
    if crash_at is not None:
        env[durable.CRASH_AT_POINT_ENV] = str(crash_at)
    done = subprocess.run([sys.executable, "-c", WRITER, str(path)], env=env, timeout=60,
                          check=False)
    return done.returncode, log.read_text().splitlines(), path.read_bytes()


def test_a_run_killed_at_each_point_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    status, points, content = run_writer(tmp_path, None)
    assert (status, content) == (0, VERSIONS[-1])
    per_write = ["atomic write", "atomic fsync", "atomic rename", "directory fsync"]
    assert points == per_write * 3
    for k in range(1, len(points) + 1):
        status, passed, content = run_writer(tmp_path, k)
        assert status == -signal.SIGKILL, k
        assert passed == points[:k], k  # killed at the kth point, not before or after
        # Killed before its rename a write has not happened; after, it wholly has.
        renamed = passed[:-1].count("atomic rename")
        assert content == VERSIONS[renamed], k
