"""End-to-end CLI runs on split-digits: outputs, scenarios, compare, determinism."""

import json

import pytest

from cl_hres.cli import main
from cl_hres.metrics import summarise

FAST = ["--epochs", "1", "--no-progress"]


def _results(path):
    return json.loads((path / "results.json").read_text())


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_run_writes_every_output(tmp_path, scenario, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--scenario", scenario, *FAST]) == 0
    res = _results(out)
    r = res["accuracy_matrix"]
    assert len(r) == 5 and all(len(row) == 5 for row in r)
    assert all(0 <= a <= 1 for row in r for a in row)
    for key, value in summarise(r, res["untrained_accuracy"], scenario).items():
        assert res[key] == value
    assert (res["fwt"] is None) == (scenario == "class")
    assert res["strategy"] == "hres-nsp" and res["benchmark"] == "split-digits"
    assert res["scenario"] == scenario and res["seed"] == 0
    assert res["trainable_parameters"]["adapter_total"] > 0
    assert res["timing"]["train_seconds"] > 0
    assert res["config"]["backbone_kwargs"]["embed_dim"] == 64
    assert len(res["null_space"]) == 5 and res["null_space"][-1]["interference"]
    assert (out / "forgetting_curves.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    if scenario == "class":
        # Before training experience j, its classes cannot be predicted at all.
        assert all(r[i][j] == 0 for i in range(5) for j in range(i + 1, 5))
    assert "hres-nsp" in capsys.readouterr().out


def test_tensorboard_has_forgetting_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main(["run", "--out", str(out), "--experiences", "2", *FAST])
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "cl/average_accuracy_seen" in tags and "cl/accuracy_exp000" in tags
    assert len(acc.Scalars("cl/accuracy_exp000")) == 2


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_compare_runs_every_strategy(tmp_path, scenario):
    out = tmp_path / "cmp"
    names = ["hres-nsp", "lora", "vpt", "linear", "joint"]
    argv = ["compare", "--strategies", ",".join(names), "--scenario", scenario, "--out", str(out)]
    assert main([*argv, "--experiences", "3", *FAST]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["strategies"]) == names
    for name in names:
        res = _results(out / name / "seed0")
        assert (
            summary["strategies"][name]["final_average_accuracy"]["mean"]
            == res["final_average_accuracy"]
        )
        assert len(res["accuracy_matrix"]) == (1 if name == "joint" else 3)
    table = (out / "comparison.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    assert (out / "comparison.png").stat().st_size > 1000


def test_same_seed_gives_identical_results(tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        main(["run", "--out", str(out), "--experiences", "3", "--strategy", "hres-nsp", *FAST])
        res = _results(out)
        res.pop("timing")
        runs.append(res)
    assert runs[0] == runs[1]
    other = tmp_path / "seed1"
    main(["run", "--out", str(other), "--experiences", "3", "--seed", "1", *FAST])
    assert _results(other)["accuracy_matrix"] != runs[0]["accuracy_matrix"]


def test_readme_example_runs(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- example:start -->")
    block = readme[start : readme.index("<!-- example:end -->")]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 30
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README-example", "exec"), namespace)
    acc = namespace["accuracy"]
    assert 0.0 < acc <= 1.0
