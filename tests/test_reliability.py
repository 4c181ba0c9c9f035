"""Resume after SIGKILL / Ctrl-C, NaN losses, output safety, input validation."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import TINY, interrupt_on_second_call, tensorboard_scalars
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cl_hres.cli.app import main

# Forward-transfer references double a run; tests/test_forward_transfer.py covers them.
# Every experience trains (see _helpers.TINY).
FAST = ["--epochs", "1", "--no-progress", "--no-fwt-reference", "--nsp-min-free-energy", "0"]


def _results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def _assert_same_results(a: dict, b: dict) -> None:
    a, b = dict(a), dict(b)
    a.pop("timing"), b.pop("timing")
    na, nb = a.pop("null_space"), b.pop("null_space")
    da, db = a.pop("feature_drift"), b.pop("feature_drift")
    fa, fb = a.pop("final_feature_drift"), b.pop("final_feature_drift")
    assert a == b  # accuracy matrix, metrics, config, parameter counts: exactly equal
    # Weights are bit-identical after resume (checked below through the matrices); the
    # interference diagnostic subtracts nearly equal features and may differ by BLAS
    # rounding (~1e-7 relative; where NSP keeps old features still it is rounding alone,
    # ~1e-8 absolute), so it is compared with a tolerance, as are the free-energy shares.
    for ha, hb in zip(na, nb, strict=True):
        assert ha["null_space_dims"] == hb["null_space_dims"]
        assert ha["interference"] == pytest.approx(hb["interference"], rel=1e-4, abs=1e-6)
        for key in ("free_energy", "old_free_energy"):  # None for the first experience
            assert [v is None for v in ha[key]] == [v is None for v in hb[key]]
            shares = [(x, y) for x, y in zip(ha[key], hb[key]) if x is not None]
            assert all(x == pytest.approx(y, rel=1e-4, abs=1e-6) for x, y in shares)
    # Drift, in class spreads (order 1 where it matters), has the same rounding.
    assert fa == pytest.approx(fb, rel=1e-4, abs=1e-6)
    for ha, hb in zip(da, db, strict=True):
        for j, d in ha["drift"].items():
            assert d == pytest.approx(hb["drift"][j], rel=1e-4, abs=1e-6)


def _snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_sigkill_during_experience_then_resume_matches_uninterrupted(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # Two epochs: the kill can land between epochs of an experience, not only in one.
    args = ["--epochs", "2", "--experiences", "3", "--no-progress", "--no-fwt-reference"]
    assert main(["run", "--out", str(ref), *args]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cl_hres", "run", "--out", str(killed), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "exp001").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # during experience 3 (index 2)
    proc.wait()
    assert not (killed / "results.json").exists()
    assert main(["run", "--resume", "--out", str(killed), "--no-progress"]) == 0
    _assert_same_results(_results(ref), _results(killed))
    # Avalanche's clock was restored: the resumed run logs at the same iteration steps.
    assert _tensorboard_steps(killed) == _tensorboard_steps(ref)
    # Read as TensorBoard does (the directory, purges applied): no point twice.
    assert _tensorboard_series(killed) == _tensorboard_series(ref)


def _tensorboard_series(run: Path) -> dict[str, list[int]]:
    """Steps of every series of both event directories (iterations, experiences)."""
    series = {}
    for sub in ("", "experiences"):
        scalars = tensorboard_scalars(run / "tensorboard" / sub)
        series |= {f"{sub}/{t}": [step for step, _ in v] for t, v in scalars.items()}
    assert series["experiences/cl/average_accuracy_seen"] == [1, 2, 3]
    return series


def _tensorboard_steps(run: Path) -> list[int]:
    """Steps of the stream accuracy in any event file (each file read alone, no purge)."""
    steps = set()
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        series = tensorboard_scalars(events)["Top1_Acc_Stream/eval_phase/test_stream"]
        steps |= {step for step, _ in series}
    return sorted(steps)


def test_sigterm_and_ctrl_c_leave_resumable_states(tmp_path, monkeypatch, capsys, tiny_run):
    """SIGTERM during experience 1 stops after it (its checkpoint written, exit 143);
    Ctrl-C during experience 3 of the resumed run exits 130; a last resume matches the
    uninterrupted run."""
    from cl_hres.avalanche import ContinualViTPlugin

    out = tmp_path / "out"
    original = ContinualViTPlugin.after_train_dataset_adaptation
    handler = signal.getsignal(signal.SIGTERM)

    sent = []

    def sigterm(self, strategy, **kw):
        if not sent:  # once: a second SIGTERM would end the process (the default action)
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the experience runs to its end
        return original(self, strategy, **kw)

    monkeypatch.setattr(ContinualViTPlugin, "after_train_dataset_adaptation", sigterm)
    assert main(["run", "--out", str(out), *TINY]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    # The run's own warnings (uneven split, closed banks), then one line for the stop.
    assert all(line.startswith("cl-hres: ") for line in err), err
    assert "SIGTERM: stopped after experience 1" in err[-1], err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["exp000"]
    assert signal.getsignal(signal.SIGTERM) == handler  # the caller's handler is back
    monkeypatch.setattr(ContinualViTPlugin, "after_train_dataset_adaptation", original)
    interrupt_on_second_call(monkeypatch, ContinualViTPlugin, "after_train_dataset_adaptation")
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(ContinualViTPlugin, "after_train_dataset_adaptation", original)
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    _assert_same_results(_results(tiny_run.out), _results(out))


def test_second_run_on_the_same_out_is_refused_while_one_writes(tmp_path, capsys):
    from cl_hres.run.preemption import output_lock

    out = tmp_path / "busy"
    with output_lock(out, "cpu"):  # as a run in another process holds it
        before = _snapshot(out)
        assert main(["run", "--out", str(out), *TINY]) == 2
        assert _snapshot(out) == before
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("cl-hres: ") for line in err), err
    assert f"(pid {os.getpid()}) is writing into {out}" in err[-1], err
    with output_lock(out, "cpu"):  # released when its holder is done
        pass


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    from cl_hres.avalanche import FiniteLossPlugin

    original = FiniteLossPlugin.before_backward

    def poison(self, strategy, **kw):
        if strategy.clock.train_exp_counter >= 1:
            strategy.loss = strategy.loss * float("nan")
        return original(self, strategy, **kw)

    monkeypatch.setattr(FiniteLossPlugin, "before_backward", poison)
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--experiences", "3", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # One error line; notes printed earlier in the run (e.g. the uneven split) may precede it.
    errors = [line for line in err if not line.startswith("cl-hres: warning:")]
    assert len(errors) == 1 and "NaN" in errors[0], err
    assert (out / "checkpoints" / "exp000" / "state.json").is_file()
    assert not (out / "results.json").exists()


def _copy(run: Path, tmp_path: Path) -> Path:
    """A copy of a shared run that a test may change."""
    return Path(shutil.copytree(run, tmp_path / "out"))


def test_existing_results_are_not_overwritten(tmp_path, capsys, tiny_run):
    out = _copy(tiny_run.out, tmp_path)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--experiences", "2", *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert main(["run", "--out", str(out), "--experiences", "2", "--overwrite", *FAST]) == 0


def test_resume_refuses_a_different_run(tmp_path, capsys, tiny_run):
    out = _copy(tiny_run.out, tmp_path)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out), "--strategy", "lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy" in err[0]
    # A checkpoint whose saved config names another backbone is refused too.
    ckpt = next((out / "checkpoints").glob("exp*")) / "state.json"
    state = json.loads(ckpt.read_text())
    state["config"]["backbone"] = "vit_small_patch16_224"
    ckpt.write_text(json.dumps(state))
    (out / "results.json").unlink()
    before = _snapshot(out)
    assert main(["run", "--resume", "--out", str(out)]) == 2
    assert "backbone" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_run_saved_before_an_option_existed_resumes_as_it_started(tmp_path, capsys, tiny_run):
    """Runs saved before nsp_min_free_energy existed gave every bank an expert: 0."""
    out = _copy(tiny_run.out, tmp_path)
    (out / "results.json").unlink()
    for path in [out / "config.json", *(out / "checkpoints").glob("exp*/state.json")]:
        saved = json.loads(path.read_text())
        config = saved.get("config", saved)
        del config["nsp_min_free_energy"]
        path.write_text(json.dumps(saved))
    # The last experience is trained again, as the run started: block 0 (whose free
    # directions the new digits do not reach) takes its expert, no bank is dormant.
    last = sorted((out / "checkpoints").glob("exp*"))[-1]
    shutil.rmtree(last)
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["nsp_min_free_energy"] == 0.0
    history = json.loads((out / "results.json").read_text())["null_space"]
    assert history[-1]["dormant"] == [] and history[-1]["experts"][0] == 3
    # Asking for the new default on resume is a change of learning settings: refused.
    (out / "results.json").unlink()
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out), "--nsp-min-free-energy", "1e-6"]) == 2
    assert "nsp_min_free_energy" in capsys.readouterr().err


def test_corrupt_checkpoint_is_refused_without_unpickling(tmp_path, capsys, tiny_run):
    out = _copy(tiny_run.out, tmp_path)
    (out / "results.json").unlink()
    ckpt = next((out / "checkpoints").glob("exp*"))
    (ckpt / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out)]) == 2
    assert "unreadable checkpoint" in capsys.readouterr().err


def test_package_never_uses_pickle_loading():
    root = Path(__file__).parents[1] / "cl_hres"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text or "weights_only=True" in text, path
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "dill" not in text, path
        assert "allow_pickle=True" not in text, path


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--rank", "0"], "rank"),
        (["--epochs", "-1"], "epochs"),
        (["--batch-size", "0"], "batch_size"),
        (["--nsp-threshold", "2"], "threshold"),
        (["--nsp-rule", "svd"], "rule"),
        (["--nsp-eta", "1.5"], "eta"),
        (["--nsp-min-free-energy", "1"], "min_free_energy"),
        (["--lr", "nan"], "lr"),
        (["--scale", "inf"], "scale"),
        (["--lora-targets", "ffn"], "lora targets"),
        (["--benchmark", "split-digitz"], "did you mean split-digits"),
        (["--strategy", "hres-nspp"], "did you mean hres-nsp"),
        (["--backbone", "vit_tiny_patc16_224"], "did you mean"),
        (["--device", "cuda"], "CUDA"),
        (["--device", "tpu"], "device"),
        (["--experiences", "11"], "11 experiences"),
        (["--img-size", "9"], "patch size"),
        (["--scenario", "domain"], "scenario"),
        (["--benchmark", "missing.npz"], "not found"),
        (["--weights", "missing.safetensors"], "not found"),
        (["--head", "svm"], "head"),
        (["--validation", "1.5"], "validation"),
        (["--epochs", "two"], "invalid int"),
        (["--config", "missing.yaml"], "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys, argv, needle, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if needle == "invalid int" else _nullcontext() as exc:
        code = main(["run", "--out", str(out), *argv])
    if needle == "invalid int":
        code = exc.value.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert needle in err[0], err[0]
    assert not out.exists()


def test_bad_yaml_recipe(tmp_path, capsys):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("strategy: hres-nsp\nrnak: 4\n")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean rank" in capsys.readouterr().err
    cfg.write_text("[unclosed")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _valid_arrays(rng):
    x_tr = rng.random((20, 8, 8))
    y_tr = np.repeat(np.arange(4), 5)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": rng.random((8, 8, 8)), "y_test": y_tr[:8]}


_CORRUPTIONS = [
    "drop_key",
    "nan_pixel",
    "inf_pixel",
    "length_mismatch",
    "label_gap",
    "negative_label",
    "float_labels",
    "object_dtype",
    "wrong_ndim",
    "labels_2d",
    "empty_train",
    "shape_mismatch",
    "test_label_unknown",
    "five_channels",
    "one_class",
    "string_pixels",
]


def _corrupt(arrays, how, rng, key):
    a = dict(arrays)
    split = key.split("_")[1]
    if how == "drop_key":
        del a[key]
    elif how in ("nan_pixel", "inf_pixel"):
        x = a[f"x_{split}"].copy()
        x.flat[rng.integers(x.size)] = np.nan if how == "nan_pixel" else np.inf
        a[f"x_{split}"] = x
    elif how == "length_mismatch":
        a[f"y_{split}"] = a[f"y_{split}"][:-1]
    elif how == "label_gap":
        a["y_train"] = np.where(a["y_train"] == 1, 7, a["y_train"])
    elif how == "negative_label":
        a[f"y_{split}"] = a[f"y_{split}"] - 1
    elif how == "float_labels":
        a[f"y_{split}"] = a[f"y_{split}"].astype(np.float32) + 0.5
    elif how == "object_dtype":
        a[f"x_{split}"] = a[f"x_{split}"].astype(object)
    elif how == "wrong_ndim":
        a[f"x_{split}"] = a[f"x_{split}"].reshape(len(a[f"x_{split}"]), -1)
    elif how == "labels_2d":
        a[f"y_{split}"] = a[f"y_{split}"][:, None]
    elif how == "empty_train":
        a["x_train"], a["y_train"] = a["x_train"][:0], a["y_train"][:0]
    elif how == "shape_mismatch":
        a["x_test"] = rng.random((8, 6, 6))
    elif how == "test_label_unknown":
        a["y_test"] = a["y_test"].copy()
        a["y_test"][0] = 9
    elif how == "five_channels":
        a[f"x_{split}"] = np.repeat(a[f"x_{split}"][..., None], 5, axis=3)
    elif how == "one_class":
        a["y_train"] = np.zeros_like(a["y_train"])
        a["y_test"] = np.zeros_like(a["y_test"])
    elif how == "string_pixels":
        a[f"x_{split}"] = a[f"x_{split}"].astype(str)
    return a


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    how=st.sampled_from(_CORRUPTIONS),
    key=st.sampled_from(["x_train", "y_train", "x_test", "y_test"]),
    seed=st.integers(0, 2**16),
    garbage=st.booleans(),
)
def test_malformed_npz_gives_exit_2_one_line_and_untouched_out(
    tmp_path, capsys, how, key, seed, garbage
):
    rng = np.random.default_rng(seed)
    case = tmp_path / f"case{seed}_{how}_{key}_{garbage}"
    case.mkdir()
    data = case / "data.npz"
    if garbage:
        data.write_bytes(rng.bytes(int(rng.integers(0, 200))))
    else:
        np.savez(data, **_corrupt(_valid_arrays(rng), how, rng, key))
    out = case / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    before = _snapshot(out)
    capsys.readouterr()
    code = main(["run", "--benchmark", str(data), "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (how, key, err)
    assert len(err) == 1 and err[0].startswith("cl-hres: error:"), err
    assert _snapshot(out) == before


def test_compare_resume_refuses_other_learning_settings(tmp_path, monkeypatch, capsys):
    from cl_hres.avalanche import ContinualViTPlugin

    out = tmp_path / "cmp"
    argv = ["compare", "--strategies", "hres", "--out", str(out), *TINY]
    original = interrupt_on_second_call(
        monkeypatch, ContinualViTPlugin, "after_train_dataset_adaptation"
    )
    assert main(argv) == 130
    monkeypatch.setattr(ContinualViTPlugin, "after_train_dataset_adaptation", original)
    capsys.readouterr()
    # The first experience read the residual stream: the rest may not read something else.
    assert main([*argv, "--resume", "--hres-input", "norm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hres_input='block'" in err[0], err


def test_checkpoint_with_another_head_width_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["run", "--strategy", "hres", "--no-concat-pretrained", "--out", str(out), *TINY]) == 0
    )
    capsys.readouterr()
    from cl_hres.run.checkpoint import latest_checkpoint

    state_file = latest_checkpoint(out / "checkpoints") / "state.json"
    state = json.loads(state_file.read_text())
    state["config"].pop("concat_pretrained")  # as a run written before the option existed
    state_file.write_text(json.dumps(state))
    for name in ("config.json", "results.json"):
        saved = json.loads((out / name).read_text())
        (saved.get("config") or saved).pop("concat_pretrained")
        (out / name).write_text(json.dumps(saved))
    assert main(["analyze", "--run", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--concat-pretrained" in err[0], err
