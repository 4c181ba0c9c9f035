"""Metric definitions and stream construction."""

import pytest

from cl_hres.data.class_order import class_order, experience_sizes
from cl_hres.data.datasets import load_digits_data
from cl_hres.data.streams import build_stream
from cl_hres.errors import ConfigError
from cl_hres.reporting.metrics import accuracy_row_from_results, summarise


def test_metrics_match_hand_computed_values():
    r = [[0.9, 0.1, 0.0], [0.7, 0.8, 0.2], [0.6, 0.5, 0.9]]
    m = summarise(r, baseline=[0.5, 0.1, 0.3], scenario="task")
    assert m["final_average_accuracy"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert m["average_incremental_accuracy"] == pytest.approx((0.9 + 0.75 + 2.0 / 3) / 3)
    # max over i < T-1: exp0 max(0.9, 0.7) - 0.6; exp1 0.8 - 0.5
    assert m["forgetting"] == pytest.approx((0.3 + 0.3) / 2)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert m["fwt_lopez_paz"] == pytest.approx(((0.1 - 0.1) + (0.2 - 0.3)) / 2)
    assert summarise(r, None, "class")["fwt_lopez_paz"] is None
    assert summarise(r, [0.5, 0.1, 0.3], "task", head="ridge")["fwt_lopez_paz"] is None
    joint = summarise([[0.9, 0.8]], None, "class")
    assert joint["forgetting"] is None and joint["final_average_accuracy"] == pytest.approx(0.85)


def test_accuracy_row_parses_task_aware_keys():
    res = {
        "Top1_Acc_Exp/eval_phase/test_stream/Task001/Exp001": 0.5,
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000": 0.25,
        "Top1_Acc_Stream/eval_phase/test_stream/Task000": 0.1,
    }
    assert accuracy_row_from_results(res, 2) == [0.25, 0.5]
    with pytest.raises(RuntimeError):
        accuracy_row_from_results(res, 3)


def test_class_split_keeps_every_class():
    order, per = class_order("seeded", 10, seed=1), experience_sizes(10, 3)
    assert sorted(order) == list(range(10)) and per == [4, 3, 3]
    assert class_order("seeded", 10, 1) == order and class_order("seeded", 10, 2) != order
    with pytest.raises(ConfigError):
        experience_sizes(4, 5)


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_streams_hold_all_classes_in_seeded_order(scenario):
    data = load_digits_data()
    bm = build_stream(data, experiences=3, scenario=scenario, seed=0)
    classes = [sorted(e.classes_in_this_experience) for e in bm.train_stream]
    assert sorted(c for cs in classes for c in cs) == list(range(10))
    assert [len(c) for c in classes] == [4, 3, 3]
    assert classes == [sorted(e.classes_in_this_experience) for e in bm.test_stream]
    if scenario == "task":
        assert [e.task_label for e in bm.train_stream] == [0, 1, 2]


def test_every_recipe_is_a_valid_config():
    from pathlib import Path

    from cl_hres.run.config import RunConfig
    from cl_hres.run.recipes import load_yaml_config

    root = Path(__file__).parents[1]
    recipes = sorted([*root.glob("strategies/*.yaml"), *root.glob("benchmarks/*.yaml")])
    assert len(recipes) >= 10
    for path in recipes:
        RunConfig.from_dict(load_yaml_config(path), source=str(path))


def test_untrained_cells_are_null_except_a_task_linear_head():
    from cl_hres.reporting.metrics import mask_untrained

    r = [[0.9, 0.0, 0.0], [0.8, 0.7, 0.0], [0.7, 0.6, 0.5]]
    masked = [[0.9, None, None], [0.8, 0.7, None], [0.7, 0.6, 0.5]]
    assert mask_untrained(r, "class", "ridge") == masked
    assert mask_untrained(r, "task", "ridge") == masked
    assert mask_untrained(r[:1], "class", "ridge") == masked[:1]  # first rows of a stream
    assert mask_untrained(r, "task", "linear") == r  # R[j-1][j] of FWT is a measurement
    assert mask_untrained([[0.9, 0.8, 0.7]], "class", "ridge", joint=True) == [[0.9, 0.8, 0.7]]
    m = summarise(masked, None, "class", "ridge")
    assert m["final_average_accuracy"] == pytest.approx(0.6) and m["fwt_lopez_paz"] is None


def test_experience_scalars_skip_unseen_and_use_joint_average():
    from cl_hres.reporting.metrics import experience_scalars

    rows = [[0.9, None, None], [0.8, 0.7, None]]
    s = experience_scalars(rows, None, "class", "ridge")
    assert set(s) == {
        "cl/accuracy_exp000",
        "cl/accuracy_exp001",
        "cl/average_accuracy_seen",
        "cl/forgetting",
        "cl/avalanche_forgetting",
        "cl/bwt",
    }
    assert s["cl/average_accuracy_seen"] == pytest.approx(0.75)
    assert s["cl/avalanche_forgetting"] == pytest.approx(0.1)
    assert s["cl/forgetting"] == pytest.approx(0.1) and s["cl/bwt"] == pytest.approx(-0.1)
    first = experience_scalars(rows[:1], None, "class", "ridge")
    assert set(first) == {"cl/accuracy_exp000", "cl/average_accuracy_seen"}
    joint = experience_scalars([[0.867, 0.7, 0.719]], None, "class", "ridge", joint=True)
    assert joint["cl/average_accuracy_seen"] == pytest.approx(0.762)
    assert len([k for k in joint if k.startswith("cl/accuracy_exp")]) == 3
    task = experience_scalars([[0.9, 0.3], [0.8, 0.7]], [0.5, 0.1], "task", "linear")
    assert task["cl/fwt_lopez_paz"] == pytest.approx(0.3 - 0.1)


def test_plugin_scalars_come_from_the_last_history_entry():
    from cl_hres.avalanche import FeatureDriftPlugin, NullSpaceProjectionPlugin

    nsp_plugin, drift_plugin = NullSpaceProjectionPlugin(), FeatureDriftPlugin()
    assert nsp_plugin.scalars() == {} and drift_plugin.scalars() == {}
    nsp = {
        "null_space_dims": [40, 0],
        "input_dims": [64, 64],
        "free_energy": [1e-5, None],
        "interference": {0: 1e-7},
    }
    drift = {"drift": {"0": {"relative": 1e-7, "class_spreads": 2e-6}}}
    nsp_plugin.history, drift_plugin.history = [nsp], [drift]
    p = {**nsp_plugin.scalars(), **drift_plugin.scalars()}
    assert p["nsp/null_space_dims/block00"] == 40 and p["nsp/null_space_dims/block01"] == 0
    assert p["nsp/null_space_fraction"] == pytest.approx(40 / 128)
    assert p["nsp/interference_max"] == 1e-7 and p["drift/class_spreads_max"] == 2e-6
    assert p["nsp/free_energy/block00"] == 1e-5 and "nsp/free_energy/block01" not in p
    drift_plugin.history = [{"drift": {}}]
    assert drift_plugin.scalars() == {}


def test_accuracy_matrix_forgetting_and_bwt_equal_avalanches_own(tmp_path, monkeypatch):
    """One run with Avalanche's own forgetting and BWT metrics in its evaluator: R, BWT
    and Avalanche's forgetting (R[j][j] - R[T-1][j]) in results.json, TensorBoard's
    scalars and metrics.csv equal what Avalanche computed, to 1e-6."""
    import csv
    import json
    import re

    import avalanche.training.plugins as plugins
    from _helpers import TINY, tensorboard_scalars
    from avalanche.evaluation.metrics import bwt_metrics, forgetting_metrics

    from cl_hres.cli.app import main
    from cl_hres.reporting.metrics import AVALANCHE_NAMES, avalanche_stream_forgetting

    made = []
    original = plugins.EvaluationPlugin

    def with_avalanche_metrics(*metrics, **kwargs):
        extra = (forgetting_metrics(experience=True, stream=True), bwt_metrics(stream=True))
        made.append(original(*metrics, *extra, **kwargs))
        return made[-1]

    monkeypatch.setattr(plugins, "EvaluationPlugin", with_avalanche_metrics)
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    r, t = res["accuracy_matrix"], len(res["accuracy_matrix"])
    got = made[0].get_all_metrics()
    worst = 0.0
    for name, (_, values) in got.items():
        m = re.fullmatch(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)", name)
        if m:  # one value per evaluation: the untrained model's, then after each step
            j = int(m.group(1))
            assert len(values) == t + 1
            for i in range(j, t):
                worst = max(worst, abs(values[i + 1] - r[i][j]))
    stream = {
        "StreamForgetting/eval_phase/test_stream": avalanche_stream_forgetting,
        "StreamBWT/eval_phase/test_stream": lambda rows: -avalanche_stream_forgetting(rows),
    }
    for name, ours in stream.items():
        values = got[name][1]
        for i in range(1, t):  # after steps 2..T (aligned from the end)
            worst = max(worst, abs(values[len(values) - t + i] - ours(r[: i + 1])))
        worst = max(worst, abs(values[-1] - res["avalanche"][name]))
    print(f"largest difference from Avalanche's own metrics: {worst:.3g}")
    assert worst < 1e-6, worst
    logged = tensorboard_scalars(out / "tensorboard" / "experiences")
    for tag, name in AVALANCHE_NAMES.items():
        assert logged[name] == logged[tag] and abs(logged[name][-1][1] - got[name][1][-1]) < 1e-6
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows] == list(range(1, t + 1))
    last = float(rows[-1]["StreamBWT/eval_phase/test_stream"])
    assert abs(last - got["StreamBWT/eval_phase/test_stream"][1][-1]) < 1e-6
    assert rows[0]["forgetting"] == ""  # undefined after one step, not 0
