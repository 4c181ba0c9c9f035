"""``cl-hres bench`` on the tiny configuration (figures are not asserted: timings vary)."""

import json

from cl_hres.cli import main


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
    assert set(res["inference"]) == {"frozen", *(f"hres_{k}_experts" for k in (1, 5, 10, 20))}
    assert res["nsp"]["accumulate_ratio"] > 0 and res["nsp"]["eigendecomposition_ms_per_block"] > 0
    assert "× floor" in (out / "bench.md").read_text()
    assert (
        main(["bench", "--config", "tiny", "--device", "cuda:7", "--out", str(tmp_path / "x")]) == 2
    )
