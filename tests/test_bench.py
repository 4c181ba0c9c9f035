"""``cl-hres bench`` on the tiny configuration (figures are not asserted: timings vary)."""

import json

import torch

from cl_hres.cli.app import main
from cl_hres.data.loaders import resolve_loader_settings
from cl_hres.nn.experts import ExpertBank
from cl_hres.nsp.config import NullSpaceConfig
from cl_hres.nsp.guard import NullSpaceGuard
from cl_hres.nsp.state import CovarianceAccumulator


def test_bench_tiny_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--config", "tiny", "--iters", "1", "--out", str(out)]) == 0
    res = json.loads((out / "bench.json").read_text())
    assert set(res["train"]) == {
        "linear",
        "floor",
        "hres",
        "hres-nsp",
        "lora",
        "vpt-deep-10",
        "l2p",
        "dualprompt",
        "coda-prompt",
    }
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
    # The pinned input-pipeline figures (docs/costs.md), with the loader a run would use.
    assert set(res["data"]) == {"in_memory", "in_memory_pil", "file"}
    for row in res["data"].values():
        assert row["images_per_s"] > 0
        expected = row["images_per_s"] / res["train"]["hres-nsp"]["images_per_s"]
        assert abs(row["ratio_to_train"] - expected) < 1e-9 * expected
    pil_workers = resolve_loader_settings("auto", device="cpu", kind="pil").num_workers
    assert res["data"]["in_memory"]["num_workers"] == 0
    assert res["data"]["file"]["num_workers"] == pil_workers
    assert res["nsp"]["accumulate_ratio"] > 0 and res["nsp"]["eigendecomposition_ms_per_block"] > 0
    assert res["nsp"]["accumulate_fp32_ratio"] > 0 and res["nsp"]["accumulate_fp32_forward_ms"] > 0
    assert "× floor" in (out / "bench.md").read_text()
    assert (
        main(["bench", "--config", "tiny", "--device", "cuda:7", "--out", str(tmp_path / "x")]) == 2
    )


def test_guards_over_shared_banks_each_accumulate_in_their_own_precision():
    """Two guards share the banks' sums; neither may change how the other records.

    The float32 guard is built second, so a guard that wrote its precision into the
    shared accumulator would make the float64 guard's products float32.
    """
    bank = ExpertBank(32, 32, rank=4, scale=1.0)
    fp64 = NullSpaceGuard([bank], NullSpaceConfig(precision="float64"))
    fp32 = NullSpaceGuard([bank], NullSpaceConfig(precision="float32"))
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    exact = x.double().T @ x.double()
    single = (x.T @ x).double()
    assert not torch.equal(exact, single)  # the input tells the two precisions apart
    acc = bank.null_space.covariance
    with fp64.recording():
        bank(x)
    assert torch.equal(acc.sums[0], exact)
    acc.zero_()
    with fp32.recording():
        bank(x)
    assert torch.equal(acc.sums[0], single)
    acc.zero_()
    with fp64.recording():  # and the float64 guard is still float64 afterwards
        bank(x)
    assert torch.equal(acc.sums[0], exact)


def test_bench_times_covariance_accumulation_in_both_precisions(monkeypatch):
    """The bench's float64 and float32 accumulation figures each run their own products."""
    from cl_hres.commands import bench

    seen: list[str] = []
    update = CovarianceAccumulator.update

    def spy(self, x, *, precision=None):
        seen.append(precision or self.precision)
        update(self, x, precision=precision)

    monkeypatch.setattr(CovarianceAccumulator, "update", spy)
    cfg = bench.BENCH_CONFIGS["tiny"]
    x = torch.randn(4, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    amp = torch.autocast(device_type="cpu", enabled=False)
    b = bench._Bench(cfg, torch.device("cpu"), x, torch.zeros(4, dtype=torch.long), amp, 0, 1)
    figures = bench._nsp_figures(b)
    # One timed pass per precision, one update per bank each (tiny: 2 blocks).
    assert seen == ["float64"] * cfg.depth + ["float32"] * cfg.depth
    for key in ("accumulate_forward_ms", "accumulate_fp32_forward_ms"):
        assert figures[key] > 0
    assert figures["accumulate_fp32_ratio"] > 0
