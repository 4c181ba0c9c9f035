"""Two CPU processes (torchrun, gloo) give the results of one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from cl_hres.cli import main


@pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun not installed",
)
def test_two_processes_match_one(tmp_path):
    # Task-incremental: also covers the untrained baseline and the per-task heads.
    args = ["--experiences", "3", "--epochs", "1", "--scenario", "task", "--no-progress"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["run", "--out", str(single), *args]) == 0
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",  # a free port: no clash with anything else on the machine
            "--nproc_per_node=2",
            "-m",
            "cl_hres",
            "run",
            "--out",
            str(multi),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
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
    # No training before the baseline: shards are combined exactly.
    assert b["untrained_accuracy"] == pytest.approx(a["untrained_accuracy"], abs=1e-12)
    # Only rank 0 wrote TensorBoard events.
    assert len(list((multi / "tensorboard").glob("events.out.tfevents.*"))) == 1
