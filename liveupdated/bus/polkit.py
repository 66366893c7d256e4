"""Delegation of the host's commands through polkit, as logind delegates reboot.

Root (on a private or session bus also the daemon's own uid) may always drive the update.
Anyone else may when polkit on the bus says so for the command's action; without polkit
on the bus the answer is no, as before. Decisions are not cached: a rule may say "yes,
once" (auth_admin_keep) or change at any time.

polkit is only polkit when root or the polkitd user runs it: on a bus where anyone may
own org.freedesktop.PolicyKit1 (a misconfigured one), a user that took the name would
answer for itself. The owner is checked, and asked by its unique name, so that the name
cannot change hands between the check and the question.
"""

import dataclasses
import functools
import pwd

import structlog
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from liveupdated.bus import driver
from liveupdated.core.orchestrator import Caller

log = structlog.get_logger("liveupdated")

MANAGE = "org.liveupdate1.manage"  # Prepare, Freeze, Cancel, Reboot, Finish; quarantine
DROP_SESSION = "org.liveupdate1.drop-session"
AUTHORITY = "org.freedesktop.PolicyKit1"
POLKIT_USER = "polkitd"  # Debian, Fedora, Arch: the system user polkitd runs as
_NO_POLKIT = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)


async def authorize(bus: MessageBus, caller: Caller, action: str) -> Caller:
    """`caller`, as an admin for this one command if polkit allows it `action`."""
    if caller.admin:
        return caller
    authority = await trusted_authority(bus)
    if authority is None:
        return caller
    reply = await bus.call(
        Message(
            destination=authority,
            path="/org/freedesktop/PolicyKit1/Authority",
            interface="org.freedesktop.PolicyKit1.Authority",
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                ["system-bus-name", {"name": Variant("s", caller.client)}],
                action,
                {},
                0,  # no interaction: the caller is a program, there is no agent to ask
                "",
            ],
        )
    )
    if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
        name = reply.error_name if reply is not None else "no reply"
        if name not in _NO_POLKIT:
            log.warning("polkit_check_failed", action=action, error=name)
        return caller
    authorized = bool(reply.body[0][0])
    log.info("polkit_checked", action=action, uid=caller.uid, authorized=authorized)
    return dataclasses.replace(caller, admin=True) if authorized else caller


@functools.cache
def _polkit_uid() -> int | None:
    try:
        return pwd.getpwnam(POLKIT_USER).pw_uid
    except KeyError:
        return None


def trusted_uids() -> frozenset[int]:
    """Who may answer for polkit: root, and the polkitd user where there is one."""
    polkit = _polkit_uid()
    return frozenset({0} if polkit is None else {0, polkit})


async def _owner(bus: MessageBus) -> str:
    """The owner of the polkit name, activating polkitd first where it is started on
    demand (Debian's is: its D-Bus activation file starts polkit.service)."""
    try:
        (owner,) = await driver.call(bus, "GetNameOwner", "s", AUTHORITY)
    except LookupError:
        await driver.call(bus, "StartServiceByName", "su", AUTHORITY, 0)  # LookupError: none
        (owner,) = await driver.call(bus, "GetNameOwner", "s", AUTHORITY)
    return str(owner)


async def trusted_authority(bus: MessageBus) -> str | None:
    """The unique name of org.freedesktop.PolicyKit1's owner when root or polkitd runs
    it; None when nobody owns the name or someone else does (then nobody is asked)."""
    try:
        owner = await _owner(bus)
        (uid,) = await driver.call(bus, "GetConnectionUnixUser", "s", owner)
    except LookupError:  # no polkit on this bus, or its owner left meanwhile
        return None
    if int(uid) not in trusted_uids():
        log.warning("polkit_untrusted", owner=owner, uid=uid,
                    detail=f"{AUTHORITY} is owned by neither root nor {POLKIT_USER}: "
                           "not asked, host commands stay root's")
        return None
    return str(owner)
