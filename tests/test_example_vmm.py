"""examples/vmm.c, the C VMM on sd-bus, built with the host's libsystemd and run against
the daemon on the test bus: CreateSession at the path sd_bus_path_encode computes, the
error map (SessionExists is EEXIST, WrongState EBUSY, NoSuchToken ENOENT), PreserveFd
of a memfd, and after a reboot of the simulated backend the same bytes back (in a copy:
a new inode, which the example tells apart). The nspawn suite (tests/nspawn/test_c_vmm.py)
runs it across a soft-reboot, where the very file comes back."""

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdated.contract import SESSION_INTERFACE
from tests.conftest import Host

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "vmm.c"
SESSION = "7-c-vmm"  # a leading digit: sd_bus_path_encode escapes it
ESCAPED = "/org/liveupdate1/session/_37_2dc_2dvmm"
SIZE = 3 * 65536 + 123  # not a whole number of the example's buffers


def libsystemd_flags() -> list[str] | None:
    if shutil.which("cc") is None or shutil.which("pkg-config") is None:
        return None
    found = subprocess.run(["pkg-config", "--cflags", "--libs", "libsystemd"],
                           capture_output=True, text=True, check=False)
    return found.stdout.split() if found.returncode == 0 else None


@pytest.fixture(scope="module")
def vmm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    flags = libsystemd_flags()
    if flags is None:
        pytest.skip("needs cc, pkg-config and libsystemd-dev (apt-get install "
                    "libsystemd-dev pkg-config)")
    binary = tmp_path_factory.mktemp("vmm") / "vmm"
    subprocess.run(
        ["cc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "include"),
         "-o", str(binary), str(SOURCE), *flags],
        check=True, capture_output=True, text=True,
    )
    return binary


@pytest.fixture
def preserving(vmm: Path, host: Host, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The example in preserve mode, holding its session: started, and returned once it
    says it preserved its memfd (its line on stdout)."""
    host.start_now()
    with subprocess.Popen(
        [str(vmm), "--address", host.address, "preserve", SESSION, "ram", str(SIZE),
         str(tmp_path / "ram.state")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # its pipes closed at the end
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                pytest.fail(f"the example exited {process.wait()}: {process.communicate()[1]}")
            assert line == (f"preserved {SESSION}/ram at {ESCAPED}: {SIZE} bytes, inode "
                            f"{(tmp_path / 'ram.state').read_text().split()[1]}\n")
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait(10)


def run(vmm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(vmm), *args], capture_output=True, text=True, timeout=60,
                          check=False)


async def test_the_c_example_preserves_at_the_sd_bus_path(
    preserving: subprocess.Popen[str], host: Host
) -> None:
    async with await host.connect() as client:
        [session] = await client.list_sessions()
        assert (session.name, session.path, session.fd_count) == (SESSION, ESCAPED, 1)
        [[fds]] = [await client.call(ESCAPED, SESSION_INTERFACE, "ListFds")]
        assert [(fd[0], fd[3]) for fd in fds] == [("ram", SIZE)]
    preserving.terminate()
    assert preserving.wait(10) == 0


async def test_after_a_simulated_reboot_the_same_bytes_come_back_in_another_file(
    preserving: subprocess.Popen[str], host: Host, vmm: Path, tmp_path: Path
) -> None:
    async with await host.connect() as client:
        await client.prepare()
        preserving.terminate()  # from Prepare on the session outlives its VMM
        assert preserving.wait(10) == 0
        await client.freeze()
        await host.reboot(client)
    back = run(vmm, "--address", host.address, "retrieve", SESSION, "ram",
               str(tmp_path / "ram.state"))
    # RetrieveSession, NoSuchToken as ENOENT, the size and every byte were checked
    # before the inode: the simulated backend hands back a copy.
    assert back.returncode == 1, back.stderr
    assert "vmm: the retrieved fd is " in back.stderr
    assert ", not the preserved file " in back.stderr


def test_the_error_map_gives_errnos(vmm: Path, host: Host, tmp_path: Path) -> None:
    host.start_now()
    state = tmp_path / "none.state"
    state.write_text("1 2 3\n")
    early = run(vmm, "--address", host.address, "retrieve", "vm", "ram", str(state))
    assert early.returncode == 1
    assert early.stderr.startswith("vmm: RetrieveSession: ")  # before any reboot
    assert "(org.liveupdate1.Error.WrongState; errno EBUSY)" in early.stderr
    assert run(vmm, "preserve", "x").returncode == 2  # usage
