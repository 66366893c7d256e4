"""luo_uapi's ctypes structs and ioctl numbers equal the kernel header's, as gcc sees them.

The header comes from the cached kernel source (scripts/kernel/fetch-source.sh); nothing
is vendored. With the header cached this runs in the default suite; without it the test
is marked `kernel` and its fixture downloads the source first.
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from liveupdated.backends import luo_uapi

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LIVEUPDATED_TEST_CACHE", "/var/cache/liveupdated-tests"))


def cached_header() -> Path | None:
    explicit = os.environ.get("LIVEUPDATE_HEADER")
    if explicit:
        return Path(explicit)
    found = sorted(CACHE.glob("src/linux-source-*/include/uapi/linux/liveupdate.h"))
    return found[-1] if found else None


pytestmark = [] if cached_header() else [pytest.mark.kernel]

STRUCTS: dict[str, tuple[type[ctypes.Structure], tuple[str, ...]]] = {
    "liveupdate_ioctl_create_session": (luo_uapi.CreateSession, ("size", "fd", "name")),
    "liveupdate_ioctl_retrieve_session": (luo_uapi.RetrieveSession, ("size", "fd", "name")),
    "liveupdate_session_preserve_fd": (luo_uapi.PreserveFd, ("size", "fd", "token")),
    "liveupdate_session_retrieve_fd": (luo_uapi.RetrieveFd, ("size", "fd", "token")),
    "liveupdate_session_finish": (luo_uapi.SessionFinish, ("size", "reserved")),
    "liveupdate_session_get_name": (luo_uapi.SessionGetName, ("size", "reserved", "name")),
}
IOCTLS = {
    "LIVEUPDATE_IOCTL_CREATE_SESSION": luo_uapi.CREATE_SESSION,
    "LIVEUPDATE_IOCTL_RETRIEVE_SESSION": luo_uapi.RETRIEVE_SESSION,
    "LIVEUPDATE_SESSION_PRESERVE_FD": luo_uapi.SESSION_PRESERVE_FD,
    "LIVEUPDATE_SESSION_RETRIEVE_FD": luo_uapi.SESSION_RETRIEVE_FD,
    "LIVEUPDATE_SESSION_FINISH": luo_uapi.SESSION_FINISH,
    "LIVEUPDATE_SESSION_GET_NAME": luo_uapi.SESSION_GET_NAME,
    "LIVEUPDATE_SESSION_NAME_LENGTH": luo_uapi.SESSION_NAME_LENGTH,
}


@pytest.fixture(scope="module")
def header() -> Path:
    path = cached_header()
    if path is None:
        script = REPO / "scripts" / "kernel" / "fetch-source.sh"
        tree = subprocess.run([script], check=True, capture_output=True, text=True).stdout
        path = Path(tree.strip()) / "include" / "uapi" / "linux" / "liveupdate.h"
    return path


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/liveupdate.h>",
             "int main(void) {"]
    for struct, (_, fields) in STRUCTS.items():
        lines.append(f'printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for field in fields:
            lines.append(
                f'printf("{struct}.{field} %zu %zu\\n", offsetof(struct {struct}, {field}),'
                f" sizeof(((struct {struct} *)0)->{field}));"
            )
    for name in IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


def _python_layout() -> dict[str, str]:
    seen: dict[str, str] = {}
    for struct, (cls, fields) in STRUCTS.items():
        seen[struct] = str(ctypes.sizeof(cls))
        for field in fields:
            descriptor = getattr(cls, field)
            seen[f"{struct}.{field}"] = f"{descriptor.offset} {descriptor.size}"
    seen.update({name: str(value) for name, value in IOCTLS.items()})
    return seen


def test_structs_and_ioctls_match_the_kernel_header(header: Path, tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc")
    include = tmp_path / "include" / "linux"
    include.mkdir(parents=True)
    shutil.copy(header, include / "liveupdate.h")
    source = tmp_path / "layout.c"
    source.write_text(_c_program())
    binary = tmp_path / "layout"
    subprocess.run([gcc, "-I", tmp_path / "include", "-o", binary, source], check=True)
    out = subprocess.run([binary], check=True, capture_output=True, text=True).stdout
    from_c = dict(line.split(" ", 1) for line in out.splitlines())
    assert _python_layout() == from_c


def test_session_names_fit_the_kernel_field() -> None:
    assert luo_uapi.encode_name("x" * 63) == b"x" * 63
    for bad in ("", "x" * 64, "a\0b"):
        with pytest.raises(ValueError):
            luo_uapi.encode_name(bad)
