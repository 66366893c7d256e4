"""bench/run.py --quick --json runs end to end and reports every performance target of
docs/DESIGN.md §5.

Only the report's shape is checked here: speed is judged by the bench, never by a test.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
HEADLINE = ["preserve_ratio", "preserve_batch_ratio", "handover_ratio", "sparse_64g_s",
            "restore_ratio", "rss_mib_10k", "retrieve_ratio", "blackout_ratio",
            "retrieve_300_ratio"]


def test_the_quick_bench_ends_with_one_json_object_of_every_figure() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--json",
                          "--retrieve-fds", "2000", "--retrieve-fds", "300"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["mode"] == "quick"
    for key in HEADLINE:
        assert math.isfinite(report[key]) and report[key] > 0, (key, report[key])
        assert isinstance(report["met"][key], bool)
        assert key in report["stats"]
    assert all(math.isfinite(v) and v > 0 for v in report["raw"].values()), report["raw"]
    for part in ("", "_bus", "_client"):  # the CPU per call of each process, beside rates
        assert report["stats"][f"preserve{part}_cpu_us_per_call"]["n"] == 1
    assert "PreserveFd rate / bare fd method" in run.stdout  # the readable table
    # The blackout by phase, the largest named.
    assert set(report["blackout_phases_s"]) == {"Freeze", "handover", "exit", "start",
                                                 "first fd", "last fd"}
    assert "largest:" in run.stdout


def test_retrieve_rounds_take_whole_vms_only() -> None:
    run = subprocess.run([sys.executable, str(BENCH), "--retrieve-fds", "150"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert "--retrieve-fds takes a positive multiple of 100" in run.stderr
