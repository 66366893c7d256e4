"""A command's life after its decision, rule by rule: the plans of core/commands.py driven
by hand in an in-memory world (tests/core/world.py), each effect answered or refused.

The decisions themselves are tested command by command beside this file; these are the
rules about what follows each effect's outcome.
"""

import pytest

from liveupdated.core import commands
from liveupdated.core import effects as fx
from liveupdated.core.errors import Storage, Timeout, WrongState
from liveupdated.core.orchestrator import Phase, UnderWay
from tests.core.steps import (
    ALICE,
    BOB,
    PAGE,
    ROOT,
    VM,
    core_with,
    facts,
    in_phase,
    new_core,
    updated,
)
from tests.core.world import Running, World

BOBS = "1001-vm"


def preserve(world: World, token: str) -> Running:
    """ALICE's PreserveFd of a new page under `token`, started: it waits on its flush."""
    fd = world.new_fd(PAGE)
    return world.start("preserve_fd", commands.preserve_fds(
        world.core, ALICE, VM, [(token, fd, ())], "PreserveFd"), owned=(fd,))


def updated_world() -> World:
    """After the reboot: ALICE's VM holding "ram", not retrieved yet but held."""
    world = World(in_phase(Phase.UPDATED, "ram"))
    world.held[(VM, "ram")] = world.new_fd(PAGE)
    return world


def world_with(*tokens: str) -> World:
    """ALICE's session VM holding `tokens`, all durable and held."""
    world = World(new_core())
    world.run("create_session", commands.create_session(world.core, ALICE, VM))
    for token in tokens:
        running = preserve(world, token)
        world.to_end(running)
        assert running.error is None
    return world


def test_a_flush_that_succeeds_after_a_rewrite_does_not_acknowledge_a_decision_taken_back() -> None:
    """PreserveFd B was pipelined on A; A's flush was refused, which took B back too.
    The journal was then rewritten (C, once the disk had room) and B's own flush
    succeeds: B is still refused, its fd let go, and nothing of it is kept."""
    world = world_with()
    a = preserve(world, "a")
    b = preserve(world, "b")
    assert isinstance(a.pending, fx.Flush) and isinstance(b.pending, fx.Flush)
    world.perform(a, fail=True)
    assert isinstance(a.error, Storage)
    c = world.start("create_session", commands.create_session(world.core, BOB, BOBS))
    assert isinstance(c.pending, fx.Rewrite)
    world.to_end(c)
    assert c.error is None and not world.journal_failed
    world.perform(b)
    assert isinstance(b.error, Storage), "a decision taken back was acknowledged"
    assert set(world.core.sessions[VM].fds) == set() and world.held == {}
    assert set(world.sizes) == set(), "the fd of the refused PreserveFd is still open"


def test_a_refused_flush_takes_back_every_decision_pipelined_on_it() -> None:
    world = world_with("kept")
    unpreserve = world.start("unpreserve_fd",
                             commands.unpreserve_fd(world.core, ALICE, VM, "kept"))
    added = preserve(world, "added")
    assert "kept" not in world.core.sessions[VM].fds  # decided: later calls see it
    world.perform(unpreserve, fail=True)
    assert isinstance(unpreserve.error, Storage)
    assert set(world.core.sessions[VM].fds) == {"kept"}
    assert set(world.held) == {(VM, "kept")}  # held and stored again; "added" let go
    world.perform(added)
    assert isinstance(added.error, Storage)
    assert world.core.storage_problem  # degraded until a rewrite succeeds


def test_a_refused_rewrite_keeps_the_daemon_degraded_and_the_fds_closed() -> None:
    world = world_with()
    world.core.storage_problem = "Read-only file system (EROFS)"
    running = preserve(world, "ram")
    assert isinstance(running.pending, fx.Rewrite)
    world.perform(running, fail=True)
    assert isinstance(running.error, Storage) and world.core.storage_problem
    assert world.sizes == {} and VM in world.core.sessions


def test_a_backend_that_refuses_prepare_takes_the_update_back_to_normal() -> None:
    world = world_with("ram")
    running = world.start("prepare", commands.prepare(world.core, ROOT))
    world.until(running, fx.PrepareHandover)
    world.perform(running, fail=True)
    world.to_end(running)
    assert isinstance(running.error, RuntimeError)
    assert world.core.phase is Phase.NORMAL and world.core.in_flight is UnderWay.NOTHING
    assert world.core.history[-1].outcome == "cancelled"


def test_freeze_times_out_naming_the_sessions_not_ready() -> None:
    world = World(in_phase(Phase.NORMAL, "ram"))
    world.run("delay", commands.delay_freeze(world.core, ALICE, VM, True))
    for token in ("ram",):
        world.held[(VM, token)] = world.new_fd(PAGE)
    world.run("prepare", commands.prepare(world.core, ROOT))
    running = world.start("freeze", commands.freeze(world.core, ROOT, 5.0))
    world.perform(running)  # the deadline
    assert isinstance(running.pending, fx.WaitChange)
    world.changed = False
    world.perform(running)  # the deadline passes with nothing changed
    assert isinstance(running.error, Timeout) and VM in str(running.error)
    assert world.core.phase is Phase.PREPARED and world.core.in_flight is UnderWay.NOTHING


def test_a_cancel_interrupts_a_freeze_waiting_on_its_barrier() -> None:
    world = world_with("ram")
    world.run("delay", commands.delay_freeze(world.core, ALICE, VM, True))
    world.run("prepare", commands.prepare(world.core, ROOT))
    freezing = world.start("freeze", commands.freeze(world.core, ROOT, 5.0))
    world.perform(freezing)
    assert isinstance(freezing.pending, fx.WaitChange)
    cancel = world.run("cancel", commands.cancel(world.core, ROOT))
    assert cancel.error is None and world.core.phase is Phase.NORMAL
    world.perform(freezing)  # woken by the Cancel
    assert isinstance(freezing.error, WrongState)
    assert world.core.phase is Phase.NORMAL and world.core.in_flight is UnderWay.NOTHING


def test_a_failed_handover_is_discarded_and_the_state_stays_frozen() -> None:
    world = world_with("ram")
    world.run("prepare", commands.prepare(world.core, ROOT))
    world.run("freeze", commands.freeze(world.core, ROOT, 5.0))
    running = world.start("reboot", commands.reboot(world.core, ROOT))
    world.until(running, fx.WriteHandover)
    world.handover = True  # partly written
    world.perform(running, fail=True)
    world.to_end(running)
    assert isinstance(running.error, Storage) and "handover" in str(running.error)
    assert not world.handover
    assert world.core.phase is Phase.FROZEN and world.core.reboot is None
    assert world.core.in_flight is UnderWay.NOTHING
    assert world.run("cancel", commands.cancel(world.core, ROOT)).error is None


def test_cancel_is_served_while_degraded_and_keeps_the_handover_when_not_journaled() -> None:
    world = world_with("ram")
    world.run("prepare", commands.prepare(world.core, ROOT))
    world.run("freeze", commands.freeze(world.core, ROOT, 5.0))
    world.handover = True
    world.core.storage_problem = "No space left on device (ENOSPC)"
    world.journal_failed = True
    running = world.run("cancel", commands.cancel(world.core, ROOT))
    assert running.error is None  # answered: the Cancel stands
    assert world.core.phase is Phase.NORMAL
    assert world.handover, "the handover went before the Cancel was durable"


def test_finish_lets_a_session_finish_under_way_end_first_and_the_backend_go_once() -> None:
    world = updated_world()
    core = world.core
    yielded: list[fx.Effect] = []
    session = world.start("finish_session", commands.finish_session(core, ALICE, VM))
    world.until(session, fx.SettleRestores)
    manager = world.start("finish", commands.finish(core, ROOT))
    world.until(manager, fx.WaitChange)
    world.changed = False
    yielded += world.to_end(session)
    assert session.error is None
    assert not any(isinstance(e, fx.BackendFinishSession) for e in yielded)
    yielded += world.to_end(manager)
    assert manager.error is None and core.phase is Phase.NORMAL
    assert sum(isinstance(e, fx.BackendFinish) for e in yielded) == 1


def test_a_session_finish_alone_lets_its_backend_part_go() -> None:
    world = updated_world()
    core = world.core
    seen: list[fx.Effect] = []
    running = world.start("finish_session", commands.finish_session(core, ALICE, VM))
    seen += world.to_end(running)
    finished = [e for e in seen if isinstance(e, fx.BackendFinishSession)]
    assert finished == [fx.BackendFinishSession(VM, ("ram",))]  # never retrieved: released


def test_a_journaled_fd_not_held_before_the_reboot_is_corrupted_not_restored() -> None:
    world = world_with("ram")
    world.close(world.held.pop((VM, "ram")))
    running = world.start("retrieve_fd", commands.retrieve_fds(
        world.core, ALICE, VM, ["ram"], "RetrieveFd", carried_in_store=False))
    assert running.ended and "not held" in str(running.error)


@pytest.mark.parametrize("carried_in_store", [False, True])
def test_a_restore_is_decided_unconditionally_and_handed_out(carried_in_store: bool) -> None:
    core = in_phase(Phase.UPDATED, "ram")
    world = World(core, carried={(VM, "ram"): PAGE}, handover=True)
    running = world.start("retrieve_fd", commands.retrieve_fds(
        core, ALICE, VM, ["ram"], "RetrieveFd", carried_in_store=carried_in_store))
    world.to_end(running)
    assert running.error is None and len(running.value) == 1
    assert core.sessions[VM].fds["ram"].restored and (VM, "ram") in world.held
    assert core.roll_back() == [], "a restore was left to undo"


def test_a_client_gone_drops_its_unprepared_sessions_at_once() -> None:
    world = world_with("ram")
    world.run("client_left", commands.client_left(world.core, ALICE.client))
    assert VM not in world.core.sessions and world.held == {} and world.sizes == {}


def test_quarantined_fds_never_block_a_session_of_the_same_name() -> None:
    core = core_with()
    world = World(core)
    core.quarantine_fds([(VM, "ram", PAGE, "found in the store")])
    running = world.start("release", commands.release_quarantined(core, ALICE, "q1"))
    assert running.ended and running.error is not None  # an admin's


def test_a_session_finish_waits_for_a_manager_finish_to_be_durable_or_taken_back() -> None:
    """Session.Finish leaves its backend part to a Manager.Finish only once that one is
    durable: one the journal refuses is taken back, and the session's backend part is
    done by Session.Finish after all."""
    world = updated_world()
    core = world.core
    seen: list[fx.Effect] = []
    session = world.start("finish_session", commands.finish_session(core, ALICE, VM))
    world.until(session, fx.SettleRestores)
    manager = world.start("finish", commands.finish(core, ROOT))
    assert isinstance(manager.pending, fx.Flush)
    world.perform(session)  # SettleRestores: then it waits on the Manager.Finish
    assert isinstance(session.pending, fx.WaitChange)
    world.perform(manager, fail=True)
    assert isinstance(manager.error, Storage) and core.phase is Phase.UPDATED
    seen += world.to_end(session)
    assert session.error is None and core.sessions[VM].finished
    assert [e for e in seen if isinstance(e, fx.BackendFinishSession)] == [
        fx.BackendFinishSession(VM, ("ram",))]


def test_a_roll_back_keeps_the_restores_counted_in_the_update_history() -> None:
    """A Session.Finish not yet durable, then a restore (unconditional: it stands), then
    the journal refuses the Finish: the history still counts the restore."""
    core = core_with("ram")
    core.create_session(BOB, BOBS)
    core.preserve_fd(BOB, BOBS, "ram", [], facts())
    updated(core)
    core.durable_through(core.serial)
    core.finish_session(ALICE, VM)
    with core.unconditional():
        core.fd_restored(BOBS, "ram", dev=1, ino=2)
    core.roll_back()
    assert core.sessions[BOBS].fds["ram"].restored and not core.sessions[VM].finished
    assert core.cycle is not None and core.cycle.fds_retrieved == 1


def test_a_client_gone_while_a_refused_prepare_kept_its_session_loses_it_then() -> None:
    """Prepare decided (prepared at once), its flush in flight; the client leaves (its
    session is kept: prepared); the journal refuses Prepare: back in normal, the session
    of the departed client goes as its departure would have dropped it."""
    world = world_with("ram")
    core = world.core
    prepare = world.start("prepare", commands.prepare(core, ROOT))
    assert isinstance(prepare.pending, fx.Flush)
    world.run("client_left", commands.client_left(core, ALICE.client))
    assert VM in core.sessions  # prepared, for now
    world.perform(prepare, fail=True)
    assert isinstance(prepare.error, Storage) and core.phase is Phase.NORMAL
    assert VM not in core.sessions and world.held == {} and world.sizes == {}


def test_a_cancel_whose_handover_cannot_be_deleted_is_done_all_the_same() -> None:
    world = world_with("ram")
    world.run("prepare", commands.prepare(world.core, ROOT))
    world.run("freeze", commands.freeze(world.core, ROOT, 5.0))
    world.handover = True
    running = world.start("cancel", commands.cancel(world.core, ROOT))
    world.until(running, fx.DiscardHandover)
    world.perform(running, fail=True)
    assert running.ended and running.error is None  # durable: the next start deletes it
    assert world.core.phase is Phase.NORMAL and not world.core.storage_problem


def test_a_session_finish_waits_for_a_manager_finish_taken_back_by_another_refusal() -> None:
    """Session.Finish durable; a Manager.Finish decided; another call's refused flush takes
    the Finish back, and a rewrite then writes past its serial. The Session.Finish still
    waits for the Finish's call to end, then does its backend part itself."""
    world = updated_world()
    core = world.core
    seen: list[fx.Effect] = []
    session = world.start("finish_session", commands.finish_session(core, ALICE, VM))
    world.perform(session)  # its flush: durable
    manager = world.start("finish", commands.finish(core, ROOT))
    other = world.start("create_session", commands.create_session(core, BOB, BOBS))
    world.perform(other, fail=True)  # takes the Finish back with it
    assert isinstance(other.error, Storage) and core.phase is Phase.UPDATED
    recovering = world.start("create_session", commands.create_session(core, BOB, "1001-x"))
    world.to_end(recovering)  # the rewrite: everything decided so far is written
    while not world.blocked(session) and not session.ended:
        seen.append(session.pending)  # type: ignore[arg-type]
        world.perform(session)
    assert not session.ended, "Session.Finish went on while the Finish's call was under way"
    world.to_end(manager)
    assert isinstance(manager.error, Storage)
    seen += world.to_end(session)
    assert session.error is None
    assert [e for e in seen if isinstance(e, fx.BackendFinishSession)] == [
        fx.BackendFinishSession(VM, ("ram",))]


def test_a_preserve_durable_through_another_flush_waits_for_the_store_all_the_same() -> None:
    """A PreserveFd whose own flush is refused, but whose records another call's flush
    wrote, is answered: only once systemd has its fd (the store barrier)."""
    world = world_with()
    running = preserve(world, "a")
    other = world.start("delay_freeze", commands.delay_freeze(world.core, ALICE, VM, True))
    world.to_end(other)  # writes everything enqueued: the PreserveFd's records too
    seen: list[fx.Effect] = []
    world.perform(running, fail=True)
    seen += world.to_end(running)
    assert running.error is None  # durable
    assert any(isinstance(e, fx.StoreBarrier) for e in seen)


def test_calls_are_decided_in_order_also_when_one_of_them_ends_the_degraded_mode() -> None:
    """ALICE pipelines UnpreserveFd("ram") then PreserveFd("ram", fd) while degraded; BOB's
    rewrite ends the degraded mode in between. The PreserveFd is decided after the
    UnpreserveFd, as it was sent."""
    world = world_with("ram")
    doomed = preserve(world, "x")
    world.perform(doomed, fail=True)  # degraded
    bobs = world.start("create_session", commands.create_session(world.core, BOB, BOBS))
    unpreserve = world.start("unpreserve_fd",
                             commands.unpreserve_fd(world.core, ALICE, VM, "ram"))
    assert isinstance(unpreserve.pending, fx.Rewrite)
    world.to_end(bobs)
    again = preserve(world, "ram")
    assert isinstance(again.pending, fx.WaitChange)  # behind the rewrite under way
    world.to_end(unpreserve)
    world.to_end(again)
    assert unpreserve.error is None and again.error is None, again.error
