"""include/liveupdate1.h: every method's signatures and every error of the contract, as
the introspection XML and contract.py have them, each error mapped to an errno."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from liveupdated.contract import ERROR_PREFIX, ERRORS

ROOT = Path(__file__).resolve().parent.parent
HEADER = (ROOT / "include" / "liveupdate1.h").read_text()


def macro(interface: str, member: str) -> str:
    words = re.sub(r"(?<!^)([A-Z])", r"_\1", member).upper()
    return f"LIVEUPDATE1_{interface.upper()}_{words}"


def test_every_method_has_its_signatures() -> None:
    defined = dict(re.findall(r'#define (\w+) "([^"]*)"', HEADER))
    for interface in ("Manager", "Session"):
        root = ET.parse(ROOT / "dbus" / f"org.liveupdate1.{interface}.xml").getroot()
        for method in root.iter("method"):
            args = list(method.iter("arg"))
            ins = "".join(str(a.get("type")) for a in args if a.get("direction") == "in")
            outs = "".join(str(a.get("type")) for a in args
                           if a.get("direction", "out") == "out")
            name = macro(interface, str(method.get("name")))
            assert (defined.get(f"{name}_IN"), defined.get(f"{name}_OUT")) == (ins, outs), name


def test_every_error_is_mapped_to_an_errno() -> None:
    mapped = re.findall(r'SD_BUS_ERROR_MAP\("([^"]+)", (E[A-Z]+)\)', HEADER)
    assert [name for name, _ in mapped] == [ERROR_PREFIX + e for e in ERRORS]
    assert all(errno != "EIO" or name.endswith("Storage") for name, errno in mapped)
