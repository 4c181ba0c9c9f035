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
def test_two_processes_match_one_and_compare_writes_once(tmp_path, tiny_task_run):
    """``compare`` under torchrun (2 ranks, gloo): its hres-nsp run equals the one-process
    ``run`` with the same options; rank 0 alone prints the table and writes events."""
    # Task-incremental: also covers the untrained baseline and the per-task heads.
    # simplecil (no SGD step) makes the second run of the same process group cheap.
    out = tmp_path / "cmp"
    names = ["hres-nsp", "simplecil"]
    args = ["--strategies", ",".join(names), *TINY, "--scenario", "task"]
    proc = _torchrun("compare", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| hres-nsp |") == 1  # one table, printed by rank 0
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["strategies"]) == names
    single, multi = tiny_task_run.out, out / "hres-nsp" / "seed0"
    a = json.loads((single / "results.json").read_text())
    b = json.loads((multi / "results.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert json.loads((out / "simplecil" / "seed0" / "results.json").read_text())["world_size"] == 2
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
