"""``cl-hres bench`` on the tiny configuration (figures are not asserted: timings vary)."""

import json

from cl_hres.cli.app import main
from cl_hres.data.loaders import resolve_loader_settings


def test_bench_tiny_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--config", "tiny", "--iters", "1", "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert set(res["train"]) == {"linear", "floor", "hres", "hres-nsp", "lora", "vpt-deep-10"}
    for row in res["train"].values():
        assert row["images_per_s"] > 0 and row["ratio_to_floor"] > 0
    assert res["train"]["floor"]["ratio_to_floor"] == 1.0
    # Equal budget: LoRA's rank is chosen to match H-Res's trainable parameters (±20%).
    hres, lora = (
        res["train"]["hres"]["trainable_parameters"],
        res["train"]["lora"]["trainable_parameters"],
    )
    assert 0.8 < lora / hres < 1.2
    assert res["train"]["hres-nsp"]["trainable_parameters"] == hres  # only the newest expert trains
    assert set(res["inference"]) == {
        "frozen",
        "hres_10_experts_rank4",
        *(f"hres_{k}_experts" for k in (1, 5, 10, 20, 50)),
    }
    # The pinned input-pipeline figures (issue 13), with the loader a run would use.
    assert set(res["data"]) == {"in_memory", "in_memory_pil", "file"}
    for row in res["data"].values():
        assert row["images_per_s"] > 0
        expected = row["images_per_s"] / res["train"]["hres-nsp"]["images_per_s"]
        assert abs(row["ratio_to_train"] - expected) < 1e-9 * expected
    pil_workers = resolve_loader_settings("auto", device="cpu", kind="pil").num_workers
    assert res["data"]["in_memory"]["num_workers"] == 0
    assert res["data"]["file"]["num_workers"] == pil_workers
    assert res["nsp"]["accumulate_ratio"] > 0 and res["nsp"]["eigendecomposition_ms_per_block"] > 0
    assert "× floor" in (out / "bench.md").read_text()
    assert (
        main(["bench", "--config", "tiny", "--device", "cuda:7", "--out", str(tmp_path / "x")]) == 2
    )
