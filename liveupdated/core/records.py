"""The events of the live update: what the core decides and the journal makes durable.

The core's state is exactly the fold of these records (`Orchestrator.apply`), so replaying
the journal rebuilds it. Records are frozen pydantic models; one discriminated union.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class SessionCreated(_Record):
    type: Literal["session_created"] = "session_created"
    session: str
    uid: int
    unit: str
    client: str  # unique bus name of the creating connection


class FdPreserved(_Record):
    type: Literal["fd_preserved"] = "fd_preserved"
    session: str
    token: str
    kind: str
    requires: tuple[str, ...]
    size: int
    name: str
    seals: int


class FdReleased(_Record):
    """The daemon no longer holds this fd (unpreserved, session dropped, finished)."""

    type: Literal["fd_released"] = "fd_released"
    session: str
    token: str
    reason: str


class FdLost(_Record):
    """The journal knew this fd but the restarted daemon got no fd for it back."""

    type: Literal["fd_lost"] = "fd_lost"
    session: str
    token: str


class FdCorrupted(_Record):
    """The fd store gave back an fd whose journal record failed its checksum."""

    type: Literal["fd_corrupted"] = "fd_corrupted"
    session: str
    token: str
    size: int


class FdRestored(_Record):
    """After the reboot: the fd was rebuilt and is held until Finish."""

    type: Literal["fd_restored"] = "fd_restored"
    session: str
    token: str


class SessionDropped(_Record):
    type: Literal["session_dropped"] = "session_dropped"
    session: str
    reason: str


class FreezeDelaySet(_Record):
    type: Literal["freeze_delay_set"] = "freeze_delay_set"
    session: str
    enabled: bool


class SessionReady(_Record):
    type: Literal["session_ready"] = "session_ready"
    session: str


class SessionFinished(_Record):
    type: Literal["session_finished"] = "session_finished"
    session: str


class PhaseChanged(_Record):
    type: Literal["phase_changed"] = "phase_changed"
    old: str
    new: str
    at_usec: int  # CLOCK_REALTIME: the only clock that spans a kexec


class Rebooted(_Record):
    """First record of a new boot: the handover from the previous kernel was found."""

    type: Literal["rebooted"] = "rebooted"
    boot_id: str
    blackout_usec: int


Record = Annotated[
    SessionCreated
    | FdPreserved
    | FdReleased
    | FdLost
    | FdCorrupted
    | FdRestored
    | SessionDropped
    | FreezeDelaySet
    | SessionReady
    | SessionFinished
    | PhaseChanged
    | Rebooted,
    Field(discriminator="type"),
]

RECORD_ADAPTER: TypeAdapter[Record] = TypeAdapter(Record)
RECORDS_ADAPTER: TypeAdapter[list[Record]] = TypeAdapter(list[Record])
