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


def test_the_manual_page_lists_the_same() -> None:
    page = (REPO / "man" / "org.liveupdate1.5.scd").read_text()
    for member, errors in FAILS_WITH.items():
        name = member.split(".", 1)[1]
        assert f"*{name}*" in page, member
        for error in errors:
            assert error in page, (member, error)


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
            core.release_quarantined(caller, name, token)
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
