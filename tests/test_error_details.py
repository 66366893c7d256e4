"""Errors carry what a client needs as data: every org.liveupdate1.Error.* reply's body is
(s message, a{sv} details), with the keys contract.ERROR_DETAILS declares (docs/API.md,
"Errors"). Over a real bus, for each kind of error and each path that answers a call
(dbus-fast's dispatch, the PreserveFd and RetrieveFd fast paths, the bus guards); a
tenant's details tell no more than its message; every key used is declared and
documented; sd-bus still reads the message."""

import argparse
import ast
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType

from liveupdated import cli, privatebus
from liveupdated.client import (
    BusError,
    Client,
    Corrupted,
    DependencyMissing,
    LiveUpdateError,
    NoSuchSession,
    NoSuchToken,
    QuotaExceeded,
    SessionClient,
    SessionExists,
    TokenExists,
    WrongState,
    error_of,
)
from liveupdated.contract import (
    BUS_NAME,
    ERROR_DETAILS,
    ERROR_PREFIX,
    ERROR_SIGNATURE,
    ERRORS,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    SESSION_INTERFACE,
    session_path,
)
from liveupdated.core.orchestrator import Phase
from liveupdated.core.records import FdCorrupted
from liveupdated.privatebus import PrivateBus
from liveupdated.sandbox import DaemonProcess
from tests.conftest import DaemonFactory, make_memfd
from tests.core.steps import ALICE, PAGE, VM, in_phase
from tests.other_uid import OtherUid
from tests.test_bus_limits import LONG_NAMES, RawClient, create_sessions

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


async def raw_reply(client: Client, path: str, interface: str, member: str,
                    signature: str = "", body: Sequence[Any] = (),
                    fds: Sequence[int] = ()) -> Message:
    """The reply as it came over the bus, not turned into an exception."""
    reply = await client.bus.call(Message(
        destination=BUS_NAME, path=path, interface=interface, member=member,
        signature=signature, body=list(body), unix_fds=list(fds)))
    assert reply is not None
    return reply


def details_of(reply: Message) -> dict[str, Any]:
    """An error reply's details, after checking its body is the contract's."""
    assert reply.message_type is MessageType.ERROR, reply.body
    assert reply.error_name and reply.error_name.startswith(ERROR_PREFIX)
    assert reply.signature == ERROR_SIGNATURE
    text, details = reply.body
    assert text and isinstance(text, str)
    for key, variant in details.items():
        assert variant.signature == ERROR_DETAILS[key], key
    return {key: variant.value for key, variant in details.items()}


async def refused(call: Awaitable[Any]) -> LiveUpdateError:
    with pytest.raises(LiveUpdateError) as info:
        await call
    return info.value


async def test_wrong_state_names_the_method_the_state_and_where_it_is_allowed(
    client: Client, bus: PrivateBus
) -> None:
    reply = await raw_reply(client, MANAGER_PATH, MANAGER_INTERFACE, "RetrieveSession", "s",
                            ["vm"])
    assert reply.error_name == ERROR_PREFIX + "WrongState"
    assert reply.body[0] == "RetrieveSession is allowed in state updated, not normal"
    assert details_of(reply) == {"command": "Manager.RetrieveSession", "state": "normal",
                                 "allowed": ["updated"]}
    exc = await refused(client.retrieve_session("vm"))
    assert isinstance(exc, WrongState)
    assert str(exc) == reply.body[0]
    assert exc.details == details_of(reply)

    session = await client.create_session("vm")
    fd = make_memfd(4096)
    await client.prepare()
    # A connection's first call is answered by the Session object, later ones by the
    # PreserveFd fast path (bus/preserve.py): the same details either way.
    async with await Client.connect(bus.address) as other:
        as_other = SessionClient(other, "vm", session.path)
        for _ in range(2):
            exc = await refused(as_other.preserve_fd("ram", fd))
            assert isinstance(exc, WrongState)
            assert exc.details == {"command": "Session.PreserveFd", "state": "prepared",
                                   "allowed": ["normal"]}
    exc = await refused(client.finish())
    assert exc.details == {"command": "Manager.Finish", "state": "prepared",
                           "allowed": ["updated"]}
    os.close(fd)


async def test_a_host_command_under_way_is_named(client: Client) -> None:
    session = await client.create_session("vm")
    fd = make_memfd(4096)
    await session.preserve_fd("ram", fd)
    await session.delay_freeze(True)
    await client.prepare()
    waiting = asyncio.ensure_future(client.freeze())
    await asyncio.sleep(0)  # let it send its call first: calls are decided in order
    exc = await refused(client.freeze())
    assert isinstance(exc, WrongState)
    assert exc.details == {"command": "Manager.Freeze", "state": "prepared",
                           "under_way": "Freeze"}
    await client.cancel()
    interrupted = await refused(waiting)
    assert isinstance(interrupted, WrongState)
    assert interrupted.details["command"] == "Manager.Freeze"
    assert interrupted.details["state"] == "normal"
    assert "allowed" not in interrupted.details
    os.close(fd)


async def test_session_and_token_errors_name_them(client: Client, bus: PrivateBus) -> None:
    session = await client.create_session("vm")
    exc = await refused(client.create_session("vm"))
    assert isinstance(exc, SessionExists) and exc.details == {"session": "vm"}

    fd = make_memfd(4096)
    await session.preserve_fd("ram", fd)
    async with await Client.connect(bus.address) as other:
        as_other = SessionClient(other, "vm", session.path)
        for _ in range(2):  # the Session object, then the fast path
            exc = await refused(as_other.preserve_fd("ram", fd))
            assert isinstance(exc, TokenExists)
            assert exc.details == {"session": "vm", "token": "ram"}
        for _ in range(2):  # RetrieveFd: the Session object, then the fast path
            exc = await refused(as_other.retrieve_fd("rom"))
            assert isinstance(exc, NoSuchToken)
            assert exc.details == {"session": "vm", "token": "rom"}
    exc = await refused(session.unpreserve_fd("rom"))
    assert isinstance(exc, NoSuchToken) and exc.details == {"session": "vm", "token": "rom"}

    exc = await refused(client.drop_session("ghost"))
    assert isinstance(exc, NoSuchSession) and exc.details == {"session": "ghost"}
    # A path nothing is exported at: the name is the path's, decoded.
    gone = SessionClient(client, "1000-gone", session_path("1000-gone"))
    exc = await refused(gone.retrieve_fd("ram"))
    assert isinstance(exc, NoSuchSession) and exc.details == {"session": "1000-gone"}
    reply = await raw_reply(client, MANAGER_PATH + "/session/not_a_path", SESSION_INTERFACE,
                            "ListFds")
    assert reply.error_name == ERROR_PREFIX + "NoSuchSession"
    assert details_of(reply) == {}  # no session's path: no name to tell

    exc = await refused(client.retrieve_quarantined("q7"))
    assert isinstance(exc, NoSuchToken) and exc.details == {"id": "q7"}
    os.close(fd)


async def test_dependency_missing_names_who_requires_and_who_blocks(client: Client) -> None:
    vm = await client.create_session("vm")
    fd = make_memfd(4096)
    await vm.preserve_fd("ram", fd)
    await vm.preserve_fd("rom", fd, ["ram"])
    await vm.preserve_fd("bios", fd, ["ram"])
    exc = await refused(vm.unpreserve_fd("ram"))
    assert isinstance(exc, DependencyMissing)
    assert exc.details == {"session": "vm", "token": "ram", "required_by": ["bios", "rom"]}

    other = await client.create_session("vm2")
    await other.preserve_fd("disk", fd, ["absent"])
    await client.prepare()
    exc = await refused(client.freeze())
    assert isinstance(exc, DependencyMissing)
    assert exc.details == {"command": "Manager.Freeze", "blocking": ["vm2"]}
    await client.cancel()
    os.close(fd)


async def test_quota_exceeded_names_the_limit_and_its_value(
    start_daemon: DaemonFactory, bus: PrivateBus
) -> None:
    start_daemon("--max-sessions", "2", "--max-fds-per-session", "1")
    async with await Client.connect(bus.address) as client:
        vm = await client.create_session("vm")
        await client.create_session("vm2")
        exc = await refused(client.create_session("vm3"))
        assert isinstance(exc, QuotaExceeded)
        assert exc.details == {"limit": "max-sessions", "maximum": 2}
        fd = make_memfd(4096)
        await vm.preserve_fd("ram", fd)
        exc = await refused(vm.preserve_fd("rom", fd))
        assert exc.details == {"limit": "max-fds-per-session", "maximum": 1, "session": "vm"}
        os.close(fd)


async def test_a_tenant_is_told_its_own_budget_and_nothing_of_the_host(
    start_daemon: DaemonFactory, bus: PrivateBus
) -> None:
    """The host's limit refuses a tenant without its value or usage, as the message does;
    the tenant's own budget is the tenant's to know."""
    start_daemon("--max-preserved-bytes", "65536", "--max-bytes-per-uid", "32768")
    async with await Client.connect(bus.address) as host, OtherUid(bus.address) as nobody:
        vm = await host.create_session("vm")
        fd = make_memfd(49152)  # root's own fds count against the host's limit only
        await vm.preserve_fd("ram", fd)
        os.close(fd)
        await nobody.call("create_session", name=f"{NOBODY}-vm")
        with pytest.raises(QuotaExceeded) as info:
            await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="big", size=40960)
        assert info.value.details == {"limit": "max-bytes-per-uid", "maximum": 32768,
                                      "uid": NOBODY}
        with pytest.raises(QuotaExceeded) as info:
            await nobody.call("preserve_fd", session=f"{NOBODY}-vm", token="ram", size=20480)
        assert info.value.details == {"limit": "max-preserved-bytes"}
        assert "65536" not in str(info.value) and "49152" not in str(info.value)

        with pytest.raises(LiveUpdateError) as denied:
            await nobody.call("prepare")
        assert denied.value.name == "AccessDenied"
        assert denied.value.details == {"command": "Manager.Prepare"}
        with pytest.raises(LiveUpdateError) as denied:
            await nobody.call("list_fds", session="vm")
        assert denied.value.name == "AccessDenied"
        assert denied.value.details == {"session": "vm"}


async def test_an_fd_index_naming_no_fd_is_refused_with_details(client: Client) -> None:
    """A refusal the bus edge makes before any method runs (bus/connection.py)."""
    session = await client.create_session("vm")
    reply = await raw_reply(client, session.path, SESSION_INTERFACE, "PreserveFd", "shas",
                            ["ram", 3, []])
    assert reply.error_name == ERROR_PREFIX + "InvalidArgument"
    assert details_of(reply) == {"command": "Session.PreserveFd"}


class TestOnABusThatAllowsMoreCalls:
    """dbus-daemon's bound on the replies a connection awaits is the daemon's (128) on
    the tests' bus, which then refuses a flood itself; a session-like bus lets it through
    (as tests/test_bus_limits.py does)."""

    @pytest.fixture
    def bus(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
        limit = '<limit name="max_replies_per_connection">50000</limit>'
        monkeypatch.setattr(privatebus, "CONFIG",
                            privatebus.CONFIG.replace("<auth>", limit + "<auth>"))
        directory = Path(tempfile.mkdtemp(prefix="lud-bus-"))  # uid 65534 connects too
        with PrivateBus(directory) as private_bus:
            yield private_bus
        shutil.rmtree(directory, ignore_errors=True)

    async def test_calls_past_the_bound_are_refused_naming_it(
        self, client: Client, daemon: DaemonProcess, bus: PrivateBus
    ) -> None:
        raw = RawClient.connect_as(NOBODY, bus)
        try:
            create_sessions(raw, LONG_NAMES)  # big answers: the flood is not read at once
            for _ in range(500):
                raw.send(MANAGER_PATH, MANAGER_INTERFACE, "ListSessions")
            await client.list_sessions()
            replies = raw.replies(500)
        finally:
            raw.close()
        quota = [r for r in replies if r.message_type is MessageType.ERROR]
        assert quota
        for r in quota:
            assert r.error_name == ERROR_PREFIX + "QuotaExceeded"
            assert details_of(r) == {"limit": "calls-in-flight", "maximum": 128}


def _error_reply(signature: str, body: list[Any], name: str) -> Message:
    return Message(message_type=MessageType.ERROR, reply_serial=1, error_name=name,
                   signature=signature, body=body)


def test_the_client_reads_a_message_alone_as_older_daemons_send_it() -> None:
    exc = error_of(_error_reply("s", ["Prepare is allowed in state normal, not frozen"],
                                ERROR_PREFIX + "WrongState"))
    assert isinstance(exc, WrongState)
    assert str(exc) == "Prepare is allowed in state normal, not frozen"
    assert exc.details == {}
    other = error_of(_error_reply("s", ["no"], "org.freedesktop.DBus.Error.AccessDenied"))
    assert isinstance(other, BusError) and other.text == "no"
    bare = error_of(_error_reply("", [], ERROR_PREFIX + "Timeout"))
    assert isinstance(bare, LiveUpdateError) and str(bare) == "" and bare.details == {}


async def test_sd_bus_and_libdbus_read_the_message(client: Client, bus: PrivateBus) -> None:
    """The body's first string is what busctl (sd-bus) and dbus-send (libdbus) print."""
    for command in (
        ["busctl", f"--address={bus.address}", "call", BUS_NAME, MANAGER_PATH,
         MANAGER_INTERFACE, "RetrieveSession", "s", "vm"],
        ["dbus-send", f"--bus={bus.address}", "--print-reply", f"--dest={BUS_NAME}",
         MANAGER_PATH, f"{MANAGER_INTERFACE}.RetrieveSession", "string:vm"],
    ):
        result = await asyncio.to_thread(subprocess.run, command, capture_output=True,
                                         text=True, timeout=30, check=False)
        assert result.returncode != 0
        assert "RetrieveSession is allowed in state updated, not normal" in result.stderr, (
            command[0], result.stderr)


# ---- every key used is declared, and documented -----------------------------------------

_ERROR_CALLS = {*ERRORS, "LiveUpdateError", "ContractError", "error_message"}


def _keys_in(node: ast.AST) -> set[str]:
    return {str(k.value) for k in getattr(node, "keys", []) if isinstance(k, ast.Constant)}


def used_detail_keys() -> dict[str, set[str]]:
    """Every details key the package's source names -> the files naming it: dicts given
    to an error class or error_message, dicts annotated Details, details["key"] = ...,
    and details.get("key") / "key" in details where a client reads them."""
    used: dict[str, set[str]] = {}
    for path in sorted((REPO / "liveupdated").rglob("*.py")):
        tree = ast.parse(path.read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in _ERROR_CALLS:
                    for arg in [*node.args, *(k.value for k in node.keywords)]:
                        for part in ast.walk(arg):
                            if isinstance(part, ast.Dict):
                                found |= _keys_in(part)
                if (name == "get" and isinstance(func, ast.Attribute)
                        and "details" in ast.unparse(func.value) and node.args
                        and isinstance(node.args[0], ast.Constant)):
                    found.add(str(node.args[0].value))
            elif (isinstance(node, ast.AnnAssign) and "Details" in ast.unparse(node.annotation)
                  and isinstance(node.value, ast.Dict)):
                found |= _keys_in(node.value)
            elif (isinstance(node, ast.Subscript) and "details" in ast.unparse(node.value)
                  and isinstance(node.slice, ast.Constant)):
                found.add(str(node.slice.value))
            elif (isinstance(node, ast.Compare) and len(node.ops) == 1
                  and isinstance(node.ops[0], ast.In | ast.NotIn)
                  and "details" in ast.unparse(node.comparators[0])
                  and isinstance(node.left, ast.Constant)):
                found.add(str(node.left.value))
        for key in found:
            used.setdefault(str(key), set()).add(str(path.relative_to(REPO)))
    return used


def test_every_details_key_used_is_declared_in_the_contract() -> None:
    used = used_detail_keys()
    undeclared = {key: files for key, files in used.items() if key not in ERROR_DETAILS}
    assert not undeclared, undeclared
    assert set(used) == set(ERROR_DETAILS), set(ERROR_DETAILS) - set(used)  # none unused
    assert used["command"] >= {"liveupdated/core/orchestrator.py", "liveupdated/cli.py"}
    assert set(ERROR_DETAILS.values()) <= {"s", "as", "t", "u"}


def test_the_scan_finds_keys_where_they_are_written() -> None:
    """used_detail_keys must see each way a key is written, or the test above passes by
    seeing nothing."""
    used = used_detail_keys()
    assert "liveupdated/core/orchestrator.py" in used["under_way"]  # details["under_way"] =
    assert "liveupdated/bus/connection.py" in used["limit"]  # error_message(..., {...})
    assert "liveupdated/cli.py" in used["under_way"]  # "under_way" not in exc.details


def _section(text: str, start: str) -> str:
    begin = text.index(start)
    rest = text[begin + len(start):]
    end = re.search(r"^#+ ", rest, re.M)
    return rest[:end.start()] if end else rest


def test_api_md_and_the_man_page_document_the_body_and_every_key() -> None:
    api = _section((REPO / "docs" / "API.md").read_text(), "## Errors")
    man = _section((REPO / "man" / "org.liveupdate1.5.scd").read_text(), "# ERRORS")
    for text in (api, man):
        assert ERROR_SIGNATURE in text
        for key, signature in ERROR_DETAILS.items():
            assert re.search(rf"\b{key}\b.*\b{re.escape(signature)}\b", text), key


# ---- what needs no bus: the core's Corrupted, the CLI's wording -------------------------

@pytest.mark.parametrize("phase", [Phase.NORMAL, Phase.UPDATED])
def test_corrupted_names_the_fd_and_the_state_its_remedy_depends_on(phase: Phase) -> None:
    core = in_phase(phase)
    core.apply(FdCorrupted(session=VM, token="ram", size=PAGE))  # what recovery records
    with pytest.raises(Corrupted) as info:
        core.check_retrieve_fd(ALICE, VM, "ram")
    assert info.value.details == {"session": VM, "token": "ram", "state": phase.value}


def _explained(command: str, exc: LiveUpdateError) -> str:
    return cli._explain(argparse.Namespace(command=command), exc)


def test_the_cli_says_a_refusal_in_its_own_terms_from_the_details() -> None:
    wrong = WrongState("PreserveFd is allowed in state normal, not prepared",
                       {"command": "Session.PreserveFd", "state": "prepared",
                        "allowed": ["normal"]})
    assert _explained("preserve", wrong) == (
        "WrongState: preserve is allowed in state normal, not prepared")
    assert _explained("update", wrong) == (  # update runs several: the method's name
        "WrongState: PreserveFd is allowed in state normal, not prepared")
    same = WrongState("Prepare is allowed in state normal, not frozen",
                      {"command": "Manager.Prepare", "state": "frozen", "allowed": ["normal"]})
    assert _explained("prepare", same) == (
        "WrongState: Prepare is allowed in state normal, not frozen")
    busy = WrongState("Cancel is not possible while Freeze is under way",
                      {"command": "Manager.Cancel", "state": "prepared", "under_way": "Freeze"})
    assert _explained("cancel", busy) == (
        "WrongState: Cancel is not possible while Freeze is under way")

    held = TokenExists("session 'vm' already holds token 'ram'; UnpreserveFd it first",
                       {"session": "vm", "token": "ram"})
    assert _explained("preserve", held) == ("TokenExists: session 'vm' already holds token "
                                            "'ram'; `liveupdatectl unpreserve vm ram` first")
    text = ("the journal record of vm/ram failed its checksum; the fd is held but never "
            "handed out: {}")
    damaged = Corrupted(text.format("UnpreserveFd it and preserve it again"),
                        {"session": "vm", "token": "ram", "state": "normal"})
    assert _explained("retrieve", damaged) == "Corrupted: " + text.format(
        "`liveupdatectl unpreserve vm ram`, then preserve it again")
    later = Corrupted(text.format("Session.Finish releases it"),
                      {"session": "vm", "token": "ram", "state": "updated"})
    assert _explained("retrieve", later) == "Corrupted: " + text.format(
        "Session.Finish releases it")
    # A message without details (another daemon) is said as it came.
    assert _explained("preserve", WrongState("PreserveFd is allowed in state normal, not "
                                             "prepared")) == (
        "WrongState: PreserveFd is allowed in state normal, not prepared")


def test_no_edge_builds_a_contract_error_with_a_bare_message() -> None:
    """Message.new_error gives an (s) body: only the bus's own errors (ErrorType.*) may be
    built with it; a contract error goes through bus/errors.py."""
    for path in sorted((REPO / "liveupdated").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "new_error"):
                assert len(node.args) > 1 and ast.unparse(node.args[1]).startswith(
                    "ErrorType."), f"{path.relative_to(REPO)}:{node.lineno}"


def test_the_client_the_cli_and_the_adapter_take_the_contract_from_contract_py() -> None:
    """No contract name, error class or path from the daemon's own modules: the client's
    side of the contract is contract.py (and the bus plumbing: driver, address)."""
    clients = [REPO / "liveupdated" / "client.py", REPO / "liveupdated" / "cli.py",
               *sorted((REPO / "liveupdated" / "vmm").glob("*.py"))]
    for path in clients:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                assert not node.module.startswith("liveupdated.core"), where
                if node.module == "liveupdated.bus":
                    assert {a.name for a in node.names} <= {"driver"}, where
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("liveupdated.core") for a in node.names)
