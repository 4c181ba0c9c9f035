"""Forward transfer against references that learn each experience alone."""

import json

import pytest

from cl_hres.cli.app import main
from cl_hres.reporting.forward_transfer import (
    forward_transfer_summary,
    method_family,
    reference_key,
)

FAST = ["--epochs", "1", "--no-progress", "--experiences", "2"]


def test_reference_key_is_shared_by_nsp_twins_only():
    base = {"strategy": "hres-nsp", "lr": 1e-3, "seed": 0, "nsp_threshold": 1e-10}
    key = reference_key(base, "w", [3, 1])
    assert key == reference_key(dict(base, strategy="hres", nsp_threshold=1e-4), "w", [1, 3])
    assert key != reference_key(dict(base, strategy="lora-nsp"), "w", [1, 3])
    assert key != reference_key(dict(base, lr=3e-4), "w", [1, 3])
    assert key != reference_key(base, "w", [1, 2])
    assert key != reference_key(base, "other-weights", [1, 3])
    assert method_family("lora-nsp") == "lora" and method_family("vpt") == "vpt"


def test_summary_averages_experiences_after_the_first():
    s = forward_transfer_summary([1.0, 0.8, 0.9], [1.0, 0.9, 0.6])
    assert s["per_experience"] == pytest.approx([0.0, -0.1, 0.3])
    assert s["mean"] == pytest.approx(0.1)
    assert forward_transfer_summary([0.5], [0.4])["mean"] is None


@pytest.mark.slow
def test_compare_reports_forward_transfer_and_shares_references(tmp_path, monkeypatch):
    import cl_hres.run.report as run_report

    made = []
    original = run_report.make_strategy

    def counting(prep, tb_dir, **kwargs):
        made.append((prep.config.strategy, tb_dir))
        return original(prep, tb_dir, **kwargs)

    # The report stage trains the references (the stream's strategy is built elsewhere).
    monkeypatch.setattr(run_report, "make_strategy", counting)
    out = tmp_path / "cmp"
    args = ["compare", "--strategies", "hres-nsp,hres", "--out", str(out), *FAST]
    assert main(args) == 0
    # Two streams, and one reference per experience, trained once for both strategies.
    references = [s for s, tb in made if tb is None]
    assert references == ["hres", "hres"]
    results = {
        s: json.loads((out / s / "seed0" / "results.json").read_text())
        for s in ("hres-nsp", "hres")
    }
    for res in results.values():
        ft = res["forward_transfer"]
        assert len(ft["per_experience"]) == 2
        assert ft["per_experience"] == pytest.approx(
            [w - r for w, r in zip(ft["within_accuracy"], ft["reference_accuracy"])]
        )
        assert ft["mean"] == pytest.approx(ft["per_experience"][1])
        # Experience 0 is learned first in the stream exactly as alone: no transfer.
        assert ft["per_experience"][0] == pytest.approx(0.0)
    ref = results["hres"]["forward_transfer"]["reference_accuracy"]
    assert results["hres-nsp"]["forward_transfer"]["reference_accuracy"] == ref
    table = (out / "comparison.md").read_text()
    assert "| FWT (pp) |" in table and "FWT vs alone" not in table
    # A rerun (one of the two strategies suffices) finds every reference in the cache.
    made.clear()
    again = ["compare", "--strategies", "hres", "--out", str(out), *FAST, "--overwrite"]
    assert main(again) == 0
    assert [s for s, tb in made if tb is None] == []
