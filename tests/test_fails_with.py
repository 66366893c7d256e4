"""What each method fails with comes from one table (contract.FAILS_WITH): the docs say
it, the introspection XML has every member of it, and the core raises nothing else."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from liveupdated.contract import ERRORS, FAILS_WITH
from liveupdated.core.errors import ALL_ERRORS, LiveUpdateError
from liveupdated.core.orchestrator import Caller, FdFacts, Limits, Orchestrator

REPO = Path(__file__).resolve().parent.parent


def test_every_error_class_is_a_contract_error() -> None:
    assert [cls.name for cls in ALL_ERRORS] == list(ERRORS)


def test_the_table_covers_every_method_of_the_introspection() -> None:
    methods = set()
    for xml in (REPO / "dbus").glob("org.liveupdate1.*.xml"):
        for interface in ET.parse(xml).getroot().iter("interface"):
            short = interface.get("name", "").rsplit(".", 1)[-1]
            methods |= {f"{short}.{m.get('name')}" for m in interface.iter("method")}
    assert methods == set(FAILS_WITH)


def _api_rows() -> dict[str, set[str]]:
    """member -> the error names its row of docs/API.md lists, per interface section."""
    rows: dict[str, set[str]] = {}
    interface = ""
    for line in (REPO / "docs" / "API.md").read_text().splitlines():
        if line.startswith("## org.liveupdate1."):
            interface = line.rsplit(".", 1)[-1]
        match = re.match(r"\| `(\w+)\(", line)
        if match and interface:
            fails = line.rstrip("|").rsplit("|", 1)[-1]
            rows[f"{interface}.{match.group(1)}"] = set(re.findall(r"\b[A-Z]\w+", fails)) & set(
                ERRORS
            )
    return rows


def test_api_md_lists_exactly_what_each_method_fails_with() -> None:
    rows = _api_rows()
    assert set(rows) == set(FAILS_WITH)
    for member, errors in FAILS_WITH.items():
        assert rows[member] == set(errors), member


def _man_sections() -> dict[str, str]:
    """method -> the text of its own entry in org.liveupdate1(5): its `*Name*(...)` line
    and the tab-indented lines under it, in its interface's "## Methods" (Manager.Finish
    and Session.Finish share a name; signals are not methods)."""
    sections: dict[str, list[str]] = {}
    interface = member = ""
    methods = False
    for line in (REPO / "man" / "org.liveupdate1.5.scd").read_text().splitlines():
        if line.startswith("#"):
            heading = re.fullmatch(r"# (MANAGER|SESSION) INTERFACE", line)
            if heading:
                interface = heading.group(1).capitalize()
            elif not line.startswith("## "):
                interface = ""  # ERRORS, LIMITS, ...: no members there
            methods = line == "## Methods"
            member = ""
            continue
        entry = re.match(r"\*(\w+)\*\(", line)
        if entry and interface and methods:
            member = f"{interface}.{entry.group(1)}"
            sections[member] = [line]
        elif member and line.startswith("\t"):
            sections[member].append(line.strip())
        elif line.strip():
            member = ""
    return {member: " ".join(lines) for member, lines in sections.items()}


def _man_errors(sections: dict[str, str], member: str) -> set[str]:
    """The errors a member's own entry names; "Fails as PreserveFd" (PreserveFds) takes
    the entry it points at, in the same interface."""
    text = sections[member]
    errors = set(re.findall(r"\b[A-Z]\w+", text)) & set(ERRORS)
    same_as = re.search(r"Fails as \*?(\w+)\*?", text)
    if same_as:
        errors |= _man_errors(sections, f"{member.partition('.')[0]}.{same_as.group(1)}")
    return errors


def test_the_manual_page_lists_under_each_member_what_it_fails_with() -> None:
    sections = _man_sections()
    assert set(sections) == set(FAILS_WITH), "members of the page and of the table differ"
    wrong = {
        member: {
            "missing": sorted(set(errors) - _man_errors(sections, member)),
            "not in the table": sorted(_man_errors(sections, member) - set(errors)),
        }
        for member, errors in FAILS_WITH.items()
        if _man_errors(sections, member) != set(errors)
    }
    assert not wrong, wrong


def test_the_manual_page_check_reads_each_member_alone() -> None:
    """The self-test: an error named only under another member, or only in the page's
    prose, is not counted for this one."""
    sections = _man_sections()
    assert "Timeout" in sections["Manager.Freeze"]
    assert "Timeout" not in _man_errors(sections, "Manager.Prepare")
    assert "Corrupted" not in _man_errors(sections, "Manager.Finish")  # ERRORS lists it
    assert _man_errors(sections, "Session.Finish") != _man_errors(sections, "Manager.Finish")
    assert _man_errors(sections, "Session.PreserveFds") == set(FAILS_WITH["Session.PreserveFd"])


# ---- the core's behaviour --------------------------------------------------------------

CALLERS = [
    Caller(uid=0, unit="", client=":1.1", admin=True),
    Caller(uid=1000, unit="", client=":1.2", admin=False),
]
NAMES = st.sampled_from(["vm", "1000-vm", "", "bad/name", "x" * 64])
TOKENS = st.sampled_from(["ram", "rom", "", "a:b"])
FACTS = FdFacts(kind="memfd", size=4096, name="ram", seals=0)


def _call(core: Orchestrator, op: str, caller: Caller, name: str, token: str) -> None:
    """Run one core command as the service would (MEMBER_OF: the D-Bus member)."""
    match op:
        case "create":
            core.create_session(caller, name)
        case "retrieve_session":
            core.retrieve_session(caller, name)
        case "prepare" | "cancel" | "finish":
            getattr(core, op)(caller)
            core.done(op.capitalize())
        case "freeze":
            attempt = core.begin_freeze(caller)
            core.freeze(caller, {}, attempt)
            core.done("Freeze", attempt)
        case "reboot":
            core.begin_reboot(caller, "boot")
            core.reboot_failed("test")  # back to a state the next command can use
        case "drop":
            core.drop_session(caller, name, "why")
        case "preserve":
            core.preserve_fd(caller, name, token, [], FACTS)
        case "preserve_many":
            core.preserve_fds(caller, name, [(token, ["ram"], FACTS)] * 17, "PreserveFds")
        case "unpreserve":
            core.unpreserve_fd(caller, name, token)
        case "retrieve":
            core.check_retrieve_fd(caller, name, token)
        case "delay":
            core.delay_freeze(caller, name, True)
        case "ready":
            core.ready_for_freeze(caller, name)
        case "session_finish":
            core.finish_session(caller, name)
        case "close":
            core.close_session(caller, name)
        case "release_quarantined":
            core.release_quarantined(caller, token)
        case _:
            raise AssertionError(op)


OPS = st.sampled_from([
    "create", "retrieve_session", "prepare", "cancel", "finish", "freeze", "reboot", "drop",
    "preserve", "preserve_many", "unpreserve", "retrieve", "delay", "ready",
    "session_finish", "close", "release_quarantined",
])
MEMBER_OF = {
    "create": "Manager.CreateSession", "retrieve_session": "Manager.RetrieveSession",
    "prepare": "Manager.Prepare", "cancel": "Manager.Cancel", "finish": "Manager.Finish",
    "freeze": "Manager.Freeze", "reboot": "Manager.Reboot", "drop": "Manager.DropSession",
    "preserve": "Session.PreserveFd", "preserve_many": "Session.PreserveFds",
    "unpreserve": "Session.UnpreserveFd", "retrieve": "Session.RetrieveFd",
    "delay": "Session.DelayFreeze", "ready": "Session.ReadyForFreeze",
    "session_finish": "Session.Finish", "close": "Session.Close",
    "release_quarantined": "Manager.ReleaseQuarantined",
}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(OPS, st.sampled_from(CALLERS), NAMES, TOKENS), max_size=30))
def test_the_core_raises_only_what_the_table_says(
    steps: list[tuple[str, Caller, str, str]],
) -> None:
    core = Orchestrator(Limits(max_sessions=3, max_fds_per_session=2))
    for op, caller, name, token in steps:
        try:
            _call(core, op, caller, name, token)
        except LiveUpdateError as exc:
            member = MEMBER_OF[op]
            assert exc.name in FAILS_WITH[member], f"{member} raised {exc.name}: {exc}"
        if core.phase.value == "frozen" and core.in_flight == "":
            core.rebooted("previous")  # reach updated, where the rest of the table lives
