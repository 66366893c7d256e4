"""`make bench-nspawn` (tests/nspawn/bench_fdstore.py) on small sizes, so that it cannot rot:
the report has every key docs/DESIGN.md §5 holds it to, and every fd came back checked
(the bench fails otherwise). Speed is judged by the bench, never here."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from .bench_fdstore import CONSOLE, Bench, headline, parse_size, run
from .container import ContainerFactory
from .installed import Installed

pytestmark = pytest.mark.nspawn

KEYS = ("blackout_over_bare_64x4_s", "blackout_over_bare_10k_s", "fdstore_retrieve_ratio",
        "start_10k_ratio")


def test_bench_reports_every_target_key(
    sid_container: ContainerFactory, sid_deb: Path, tmp_path: Path
) -> None:
    handover = tmp_path / "handover"
    handover.mkdir(mode=0o700)
    # As a user installs it: the unit as shipped, no test drop-in.
    installed = Installed.install(sid_container(nspawn_args=CONSOLE), sid_deb, handover)
    log = io.StringIO()
    sizes = [parse_size("3x2:8192"), parse_size("4x5:4096")]
    report = headline(run(Bench(installed, log=log), sizes, repeats=1))
    json.dumps(report)  # the bench's last line
    for key in KEYS:
        assert math.isfinite(report[key]), (key, report[key])
        # Small sizes stand in for the named ones: shown, never judged against a target.
        assert report["met"][key] is None and report["stand_in"][key] in report["sizes"]
    assert report["fdstore_retrieve_ratio"] > 0 and report["start_10k_ratio"] > 0
    for label, size in (("3x2:8192", 6), ("4x5:4096", 20)):
        [cycle] = report["sizes"][label]["rounds"]
        assert cycle["fds"] == size
        assert cycle["bare_s"] > 0 and cycle["blackout_s"] > 0
        assert set(cycle["phases_s"]) == {"Freeze", "Reboot() to shutdown",
                                          "soft-reboot to READY", "READY to first fd",
                                          "first fd to last fd"}
        # The phases follow one another: they add up to Freeze -> last fd back.
        assert math.isclose(sum(cycle["phases_s"].values()), cycle["blackout_s"],
                            abs_tol=1e-6)
    assert "blackout" in log.getvalue()
