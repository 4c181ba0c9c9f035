"""Two CPU processes (torchrun, gloo) give the results of one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from _helpers import TINY

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run(
        # --standalone: a free port, no clash with anything else on the machine.
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "cl_hres", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@needs_torchrun
def test_two_processes_match_one(tmp_path, tiny_task_run):
    # Task-incremental: also covers the untrained baseline and the per-task heads.
    single, multi = tiny_task_run.out, tmp_path / "multi"
    proc = _torchrun("run", "--out", str(multi), *TINY, "--scenario", "task")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("hres-nsp ") == 1  # only rank 0 reports
    a = json.loads((single / "results.json").read_text())
    b = json.loads((multi / "results.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    # Same global batches (DistributedSampler), gradients averaged by DDP, statistics
    # all-reduced: equal up to floating-point summation order.
    for row_a, row_b in zip(a["accuracy_matrix"], b["accuracy_matrix"], strict=True):
        assert row_b == pytest.approx(row_a, abs=0.02)
    assert b["final_average_accuracy"] == pytest.approx(a["final_average_accuracy"], abs=0.02)
    # Covariance increments are all-reduced before the free-energy shares are read.
    for ha, hb in zip(a["null_space"][1:], b["null_space"][1:], strict=True):
        assert hb["free_energy"] == pytest.approx(ha["free_energy"], rel=0.25, abs=1e-6)
        assert hb["old_free_energy"] == pytest.approx(ha["old_free_energy"], rel=0.25, abs=1e-6)
    # No training before the baseline: shards are combined exactly.
    assert b["untrained_accuracy"] == pytest.approx(a["untrained_accuracy"], abs=1e-12)
    # Only rank 0 wrote TensorBoard events.
    for sub in ("", "experiences"):
        assert len(list((multi / "tensorboard" / sub).glob("events.out.tfevents.*"))) == 1


@needs_torchrun
def test_compare_under_torchrun_writes_once(tmp_path):
    out = tmp_path / "cmp"
    args = ["--experiences", "2", "--epochs", "1", "--no-progress", "--no-fwt-reference"]
    proc = _torchrun("compare", "--strategies", "hres-nsp,linear", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| hres-nsp |") == 1  # one table, printed by rank 0
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["strategies"]) == ["hres-nsp", "linear"]
    for name in ("hres-nsp", "linear"):
        assert json.loads((out / name / "seed0" / "results.json").read_text())["world_size"] == 2
