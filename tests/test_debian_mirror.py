"""scripts/debian-mirror.sh: the Debian mirror comes from the host's apt sources or
LIVEUPDATED_DEBIAN_MIRROR, never from a host name the project made up, and its absence
is one line and exit 1. The scripts that download from Debian all ask it; the package
names no invented maintainer address."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "scripts" / "debian-mirror.sh"
DOWNLOADERS = [ROOT / "guest" / "sid-root.sh", ROOT / "scripts" / "kernel" / "fetch-source.sh",
               ROOT / "tests" / "nspawn" / "rootfs.py"]
SECURITY_ONLY = """Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
"""


def mirror(apt: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "LIVEUPDATED_DEBIAN_MIRROR"}
    return subprocess.run([str(HELPER)], env={**environ, "APT_ETC": str(apt), **env},
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def apt(tmp_path: Path) -> Path:
    (tmp_path / "sources.list.d").mkdir()
    return tmp_path


def test_the_first_debian_uri_of_an_enabled_deb_stanza(apt: Path) -> None:
    (apt / "sources.list.d" / "a.sources").write_text(
        SECURITY_ONLY + "\nTypes: deb\nEnabled: no\nURIs: http://off.example/debian\n"
        "\n# a comment stanza\nTypes: deb-src deb\n"
        "# URIs: http://commented.example/debian\n"
        "URIs: https://third-party.example/repo https://mirror.example/pub/debian/\n"
        "Suites: sid\n"
    )
    found = mirror(apt)
    assert (found.returncode, found.stdout, found.stderr) == (
        0, "https://mirror.example/pub/debian\n", "")


def test_one_line_sources_are_read_when_no_stanza_names_one(apt: Path) -> None:
    (apt / "sources.list.d" / "security.sources").write_text(SECURITY_ONLY)
    (apt / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://legacy.example/debian "
        "bookworm main\n"
    )
    assert mirror(apt).stdout == "http://legacy.example/debian\n"


def test_the_variable_wins(apt: Path) -> None:
    (apt / "sources.list").write_text("deb http://legacy.example/debian bookworm main\n")
    found = mirror(apt, LIVEUPDATED_DEBIAN_MIRROR="http://chosen.example/debian/")
    assert found.stdout == "http://chosen.example/debian\n"


def test_no_mirror_is_one_line_and_exit_1(apt: Path) -> None:
    (apt / "sources.list.d" / "security.sources").write_text(SECURITY_ONLY)
    found = mirror(apt)
    assert found.returncode == 1 and found.stdout == ""
    assert len(found.stderr.splitlines()) == 1
    assert "set LIVEUPDATED_DEBIAN_MIRROR=URL" in found.stderr


def test_no_script_names_a_mirror_host_of_its_own() -> None:
    for path in [*DOWNLOADERS, HELPER]:
        text = path.read_text()
        assert "deb.debian.org" not in text, path
        assert "debian-mirror.sh" in text or path == HELPER, path


def test_the_package_names_no_invented_address() -> None:
    addresses = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
    for path in (ROOT / "packaging" / "debian").iterdir():
        found = [a for a in addresses.findall(path.read_text()) if "example" not in a]
        assert found == [], f"{path.name}: {found}"
