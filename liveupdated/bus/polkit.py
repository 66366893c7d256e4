"""Delegation of the host's commands through polkit, as logind delegates reboot.

Root (on a private or session bus also the daemon's own uid) may always drive the update.
Anyone else may when polkit on the bus says so for the command's action; without polkit
on the bus the answer is no, as before. Decisions are not cached: a rule may say "yes,
once" (auth_admin_keep) or change at any time.
"""

import dataclasses

import structlog
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from liveupdated.core.orchestrator import Caller

log = structlog.get_logger("liveupdated")

MANAGE = "org.liveupdate1.manage"  # Prepare, Freeze, Cancel, Reboot, Finish; quarantine
DROP_SESSION = "org.liveupdate1.drop-session"
AUTHORITY = "org.freedesktop.PolicyKit1"
_NO_POLKIT = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)


async def authorize(bus: MessageBus, caller: Caller, action: str) -> Caller:
    """`caller`, as an admin for this one command if polkit allows it `action`."""
    if caller.admin:
        return caller
    reply = await bus.call(
        Message(
            destination=AUTHORITY,
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
