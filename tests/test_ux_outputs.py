"""TensorBoard scalars, the joint reference, null cells of R and runs that failed early."""

import gc
import json
from pathlib import Path

import numpy as np
import pytest
from _helpers import TINY, interrupt_on_second_call, tensorboard_scalars

from cl_hres.cli.app import main

# Forward-transfer references double a run; tests/test_forward_transfer.py covers them.
# Every experience trains (see _helpers.TINY).
FAST = ["--epochs", "1", "--no-progress", "--no-fwt-reference", "--nsp-min-free-energy", "0"]


def _results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def _scalars(run: Path, axis: str = "experiences") -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of one of a run's TensorBoard directories, purges applied.

    ``axis``: "experiences" (the per-experience ``cl/``, ``nsp/``, ``drift/`` scalars) or
    "iterations" (Avalanche's metrics).
    """
    return tensorboard_scalars(
        run / "tensorboard" / ("experiences" if axis == "experiences" else "")
    )


def _snapshot(path: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _check_tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    res = _results(run)
    r = res["accuracy_matrix"]
    tb = _scalars(run)
    avalanche = _scalars(run, "iterations")
    # Experiences not trained yet: null in results.json, absent (not 0) in TensorBoard.
    assert [[a is None for a in row] for row in r] == [[j > i for j in range(3)] for i in range(3)]
    assert not any(t.startswith("Top1_Acc_Exp/") for t in avalanche)  # it logs them as 0
    assert not any(t.startswith("cl/") for t in avalanche)
    for j in range(3):
        assert [v for _, v in tb[f"cl/accuracy_exp{j:03d}"]] == pytest.approx(
            [r[i][j] for i in range(j, 3)]
        )
    average = [v for _, v in tb["cl/average_accuracy_seen"]]
    assert average == pytest.approx([np.mean(r[i][: i + 1]) for i in range(3)])
    assert average[-1] == pytest.approx(res["final_average_accuracy"])
    assert tb["cl/forgetting"][-1][1] == pytest.approx(res["forgetting"])
    assert tb["cl/bwt"][-1][1] == pytest.approx(res["bwt"])
    # Avalanche's metrics per training iteration; the cl/, nsp/ and drift/ points of an
    # experience at the number of experiences learned.
    iterations = [s for s, _ in avalanche["Top1_Acc_Stream/eval_phase/test_stream"]]
    assert len(iterations) == 3 and iterations == sorted(iterations) and iterations[0] > 2
    steps = [1, 2, 3]
    assert [s for s, _ in tb["cl/average_accuracy_seen"]] == steps
    assert [s for s, _ in tb["cl/forgetting"]] == steps[1:]
    assert [s for s, _ in tb["nsp/null_space_dims/block00"]] == steps
    assert [s for s, _ in tb["drift/class_spreads_max"]] == steps[1:]
    assert "nsp/null_space_fraction" in tb and "nsp/interference_max" in tb
    assert [s for s, _ in tb["drift/class_spreads_exp000"]] == steps[1:]
    loss = avalanche["Loss_Epoch/train_phase/train_stream"]
    assert [s for s, _ in loss] == iterations  # one epoch per experience, no duplicates
    return {**tb, **avalanche}


def test_tensorboard_and_resume_after_interrupt_without_duplicates(tmp_path, monkeypatch, tiny_run):
    from cl_hres.avalanche import ContinualViTPlugin

    out = tmp_path / "out"
    expected = _check_tensorboard(tiny_run.out)
    # Ctrl-C after experience 2's loss was logged, before its checkpoint: the resumed run
    # logs that loss again, and TensorBoard must keep only one point per step.
    original = interrupt_on_second_call(monkeypatch, ContinualViTPlugin, "after_training_exp")
    assert main(["run", "--out", str(out), *TINY]) == 130
    gc.collect()  # as at process exit: the interrupted run's event file is closed
    monkeypatch.setattr(ContinualViTPlugin, "after_training_exp", original)
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    resumed = _check_tensorboard(out)
    assert resumed.keys() == expected.keys()
    for tag, series in expected.items():
        assert [s for s, _ in resumed[tag]] == [s for s, _ in series], tag
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in series]), tag


def test_interrupt_after_logging_before_checkpoint_purges_the_experience_axis(
    tmp_path, monkeypatch, tiny_run
):
    """Ctrl-C after experience 2's per-experience points were logged, before its
    checkpoint: the resumed run logs them again, TensorBoard keeps one point per step."""
    import cl_hres.run.loop as run_loop

    original, calls = run_loop.save_checkpoint, {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(run_loop, "save_checkpoint", interrupt)
    assert main(["run", "--out", str(out), *TINY]) == 130
    gc.collect()  # as at process exit: the interrupted run's event files are closed
    assert [s for s, _ in _scalars(out)["cl/average_accuracy_seen"]] == [1, 2]
    monkeypatch.setattr(run_loop, "save_checkpoint", original)
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    resumed, expected = _scalars(out), _scalars(tiny_run.out)
    assert resumed.keys() == expected.keys()
    for tag, series in expected.items():
        assert [s for s, _ in resumed[tag]] == [s for s, _ in series], tag
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in series]), tag


def test_joint_reference_is_its_average_accuracy(tmp_path):
    out = tmp_path / "joint"
    assert main(["run", "--strategy", "joint", "--out", str(out), "--experiences", "3", *FAST]) == 0
    res = _results(out)
    (row,) = res["accuracy_matrix"]
    assert None not in row
    tb = _scalars(out)
    # The mean of joint's single row, not its accuracy on experience 1.
    [(_, average)] = tb["cl/average_accuracy_seen"]
    assert average == pytest.approx(np.mean(row)) == pytest.approx(res["final_average_accuracy"])
    assert [v for _, v in tb["cl/accuracy_exp002"]] == pytest.approx([row[2]])


def test_comparison_plot_draws_joint_at_its_average(tmp_path):
    from cl_hres.reporting.plots import plot_comparison

    seq = [[0.9, None, None], [0.8, 0.7, None], [0.7, 0.6, 0.5]]
    runs = {
        "hres-nsp": [{"accuracy_matrix": seq}],
        "joint": [
            {"accuracy_matrix": [[0.867, 0.7, 0.719]]},
            {"accuracy_matrix": [[0.8, 0.7, 0.8]]},
        ],
    }
    fig = plot_comparison(runs, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 1000
    average, first = fig.axes[:2]  # a third panel may follow (forward transfer)
    joint = [line for line in average.lines if line.get_label() == "joint"]
    assert len(joint) == 1 and joint[0].get_linestyle() == "--"
    assert joint[0].get_ydata()[0] == pytest.approx((0.762 + 0.7667) / 2, abs=1e-3)
    curve = [line for line in average.lines if line.get_label() == "hres-nsp"][0]
    assert list(curve.get_ydata()) == pytest.approx([0.9, 0.75, 0.6])
    joint_first = [line for line in first.lines if line.get_label() == "joint"][0]
    assert joint_first.get_ydata()[0] == pytest.approx((0.867 + 0.8) / 2)


def _missing_class_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.random((24, 8, 8)),
        y_train=np.repeat(np.arange(4), 6),
        x_test=rng.random((9, 8, 8)),
        y_test=np.repeat(np.arange(3), 3),  # class 3 has no test images
    )
    return path


def test_stream_errors_leave_out_untouched(tmp_path, capsys):
    data = _missing_class_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    argv = ["run", "--benchmark", str(data), "--experiences", "2", "--out", str(out), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test split has no images of class 3" in err[0], err
    assert _snapshot(out) == before
    # Nothing was left that would refuse or break the corrected run.
    assert main(["run", "--resume", "--out", str(out)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(
    tmp_path, monkeypatch
):
    from cl_hres.avalanche import ContinualViTPlugin

    original = ContinualViTPlugin.after_training_exp

    def crash(self, strategy, **kw):  # after experience 1's loss was logged
        raise MemoryError("simulated out-of-memory")

    out = tmp_path / "out"
    argv = ["run", "--out", str(out), "--experiences", "2", *FAST]
    loss = "Loss_Epoch/train_phase/train_stream"
    for rerun in (argv, ["run", "--resume", "--out", str(out), "--no-progress"]):
        monkeypatch.setattr(ContinualViTPlugin, "after_training_exp", crash)
        with pytest.raises(MemoryError):
            main([*argv, "--overwrite"])
        gc.collect()  # as at process exit: the failed run's event file is closed
        assert (out / "config.json").is_file() and len(_scalars(out, "iterations")[loss]) == 1
        assert not (out / "checkpoints" / "exp000").exists()
        monkeypatch.setattr(ContinualViTPlugin, "after_training_exp", original)
        # Neither a plain rerun is refused nor does --resume fail: both start afresh,
        # without the failed run's TensorBoard points.
        assert main(rerun) == 0, rerun
        assert len(_results(out)["accuracy_matrix"]) == 2
        assert len(_scalars(out, "iterations")[loss]) == 2


def test_uneven_split_is_announced():
    import warnings

    from cl_hres._warnings import ClHresWarning
    from cl_hres.data.datasets import load_digits_data
    from cl_hres.data.streams import build_stream

    data = load_digits_data()
    with pytest.warns(ClHresWarning, match=r"10 classes do not split evenly.*4, 3, 3\)$"):
        build_stream(data, experiences=3)
    with pytest.warns(
        ClHresWarning, match=r"2, 1, 1, 1, 1, 1, 1, 1, 1\); 8 experiences with a single class leave"
    ):
        build_stream(data, experiences=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClHresWarning)
        build_stream(data, experiences=5)


def test_check_output_dir_ignores_leftovers_of_failed_runs(tmp_path):
    from cl_hres.errors import ConfigError
    from cl_hres.run.prepare import check_output_dir

    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "checkpoints" / "exp000.tmp").mkdir(parents=True)  # an unfinished checkpoint
    check_output_dir(out, resume=False, overwrite=False)
    check_output_dir(out, resume=True, overwrite=False)
    (out / "checkpoints" / "exp000").mkdir()
    (out / "checkpoints" / "exp000" / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match="--overwrite"):
        check_output_dir(out, resume=False, overwrite=False)
    (out / "checkpoints" / "exp000" / "state.json").unlink()
    (out / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds results"):
        check_output_dir(out, resume=False, overwrite=False)


def test_experiences_that_can_learn_nothing_run_no_step_and_log_no_loss(tmp_path):
    """Default hres-nsp on split-digits: after the first experience every bank is closed
    (blocks 1-5) or dormant (block 0), so no SGD step runs and no epoch loss is logged."""
    from cl_hres.data.datasets import load_digits_data

    out = tmp_path / "out"
    argv = ["run", "--out", str(out), "--experiences", "3", "--epochs", "1", "--no-progress"]
    assert main([*argv, "--no-fwt-reference"]) == 0
    res = _results(out)
    history = res["null_space"]
    assert [h["dormant"] for h in history] == [[], [0], [0]]
    # Measured before training: block 0's free directions hold ~nothing of the new
    # digits (float32's floor); blocks 1-5 are closed, so no pass measures them.
    assert history[0]["admission_free_energy"] == [None] * 6
    assert all(h["admission_free_energy"][0] < 1e-6 for h in history[1:])
    assert all(h["admission_free_energy"][1:] == [None] * 5 for h in history[1:])
    assert all(h["experts"] == [1] * 6 for h in history)
    assert res["trainable_parameters"]["adapter_last_experience"] == 0
    assert len(_scalars(out, "iterations")["Loss_Epoch/train_phase/train_stream"]) == 1
    # Per-experience curves still get one point per experience, though the iteration
    # counter stood still after the first one.
    tb = _scalars(out)
    assert [s for s, _ in tb["cl/average_accuracy_seen"]] == [1, 2, 3]
    assert [s for s, _ in tb["nsp/null_space_dims/block00"]] == [1, 2, 3]
    # The throughput counts the images of the experience that trained (4 of 10 classes).
    images = res["timing"]["train_images"]
    assert 0.3 * len(load_digits_data().train) < images < 0.5 * len(load_digits_data().train)
