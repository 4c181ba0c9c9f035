"""Loader settings, worker loaders, batched transforms and the GPU recipe (no timings)."""

import re
import shlex
from pathlib import Path

import pytest
import torch
from _helpers import make_vit

from cl_hres.cli.app import main
from cl_hres.data.batch_transforms import BatchTransform, precompute_in_memory
from cl_hres.data.datasets import load_digits_data
from cl_hres.data.loaders import init_worker, resolve_loader_settings
from cl_hres.errors import ConfigError
from cl_hres.run.config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"
DIGITS_CFG = {"input_size": [1, 28, 28], "mean": [0.29], "std": [0.35], "interpolation": "bilinear"}


def test_auto_settings_follow_device_and_data(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu_tensor = resolve_loader_settings("auto", device="cpu", kind="tensor", cores=2)
    assert (cpu_tensor.num_workers, cpu_tensor.threads, cpu_tensor.pin_memory) == (0, 2, False)
    cpu_pil = resolve_loader_settings("auto", device="cpu", kind="pil", cores=2)
    assert (cpu_pil.num_workers, cpu_pil.threads) == (1, 1)  # never more threads than cores
    gpu = resolve_loader_settings("auto", device="cuda:0", kind="pil", cores=16)
    assert (gpu.num_workers, gpu.pin_memory, gpu.persistent_workers) == (8, True, True)
    assert resolve_loader_settings(3, device="cpu", cores=2).threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit setting is what runs
    assert resolve_loader_settings("auto", device="cpu", kind="tensor", cores=2).threads == 1
    for bad in (-1, "x", 1.5, True):
        with pytest.raises(ConfigError, match="num_workers"):
            RunConfig(num_workers=bad)


def test_bad_num_workers_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's one-line error
        main(["run", "--num-workers", "-2", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-workers" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_workers: many\n")
    assert main(["run", "--config", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_workers" in err and not (tmp_path / "o").exists()


def _strategy_and_stream():
    from cl_hres.avalanche.strategies import LinearProbe
    from cl_hres.data.streams import build_stream

    data, tfs = precompute_in_memory(load_digits_data(), DIGITS_CFG, "none")
    bm = build_stream(data, experiences=5, seed=0, transforms=tfs)
    strategy = LinearProbe(model=make_vit(img_size=28, patch_size=7), train_mb_size=16)
    strategy.experience = bm.train_stream[0]
    strategy.adapted_dataset = bm.train_stream[0].dataset.train()
    return strategy, bm


def test_worker_loader_gives_the_same_batches_and_gets_its_arguments():
    strategy, _ = _strategy_and_stream()
    strategy.make_train_dataloader(num_workers=0)
    strategy.dataloader.sampler.set_epoch(3)
    plain = list(strategy.dataloader)
    strategy.make_train_dataloader(num_workers=1, persistent_workers=True)
    loader = strategy.dataloader
    assert (loader.num_workers, loader.persistent_workers) == (1, True)
    assert loader.worker_init_fn is init_worker and loader.pin_memory is False  # CPU device
    loader.sampler.set_epoch(3)
    for a, b in zip(plain, loader, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    strategy.make_eval_dataloader(num_workers=1, pin_memory=True, persistent_workers=True)
    assert (strategy.dataloader.num_workers, strategy.dataloader.pin_memory) == (1, True)


def test_batched_eval_transform_is_bit_identical_to_the_per_image_one():
    from cl_hres.data.transforms import build_transforms

    data = load_digits_data()
    per_image = build_transforms(DIGITS_CFG, kind="tensor", augment="none")[1]
    pre, (train_tf, _) = precompute_in_memory(data, DIGITS_CFG, "none")
    assert torch.equal(pre.test.images, torch.stack([per_image(x) for x, _ in data.test]))
    image = pre.train[0][0]
    assert train_tf(image) is image
    assert precompute_in_memory(data, DIGITS_CFG, "crop") is None  # augmented: per image


def test_batched_transform_leaves_the_callers_images_alone():
    """Float32 images already at the input size are normalised in a copy, not in place."""
    cfg = {"input_size": [1, 8, 8], "mean": [0.5], "std": [0.25]}
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    out = BatchTransform(cfg)(x)
    assert torch.equal(x, before)
    assert torch.allclose(out, (before - 0.5) / 0.25)


def _package_sources() -> dict[str, str]:
    root = Path(__file__).resolve().parents[1] / "cl_hres"
    return {str(f.relative_to(root)): f.read_text() for f in sorted(root.rglob("*.py"))}


def test_input_pipeline_pieces_are_defined_once():
    """One crop policy, one DataLoader-argument builder, one worker-count parser."""
    sources = _package_sources()

    def where(pattern: str) -> list[str]:
        return [name for name, text in sources.items() for _ in re.finditer(pattern, text)]

    # The random-resized-crop policies (scale, ratio) of cl_hres.data.transforms only.
    assert where(r"\(0\.05, 1\.0\)") == ["data/transforms.py"]
    assert where(r"3 / 4, 4 / 3") == ["data/transforms.py"]
    # Every DataLoader's workers are set up by loaders.loader_kwargs.
    assert where(r"worker_init_fn=init_worker") == ["data/loaders.py"]


def test_cli_parses_num_workers_with_the_loaders_parser(tmp_path, capsys):
    """``--num-workers`` and a recipe's ``num_workers`` accept and refuse the same values."""
    from cl_hres.cli.options import _workers
    from cl_hres.data.loaders import parse_num_workers

    assert (_workers("auto"), _workers("0"), _workers("3")) == ("auto", 0, 3)
    for bad in ("-2", "many", "1.5"):
        with pytest.raises(ConfigError) as info:
            parse_num_workers(bad)
        with pytest.raises(SystemExit):
            main(["run", "--num-workers", bad, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(info.value) in err


def test_spawned_workers_print_no_known_warnings(capfd):
    from _warning_dataset import WarningDataset  # imports no cl_hres: the wrapper must
    from torch.utils.data import DataLoader

    from cl_hres.data.loaders import WorkerSafeDataset

    loader = DataLoader(
        WorkerSafeDataset(WarningDataset()),
        batch_size=2,
        num_workers=1,
        multiprocessing_context="spawn",
        worker_init_fn=init_worker,
    )
    assert len(list(loader)) == 1
    assert "QP solver" not in capfd.readouterr().err


def _gpu_recipe_args() -> list[str]:
    block = re.search(r"<!-- gpu-recipe:start -->\n```bash\n(.*?)```", README.read_text(), re.S)
    command = block.group(1).replace("\\\n", " ")
    args = shlex.split(command)
    assert args[:2] == ["cl-hres", "run"]
    return args[2:]


def test_gpu_recipe_is_cuda_bf16_with_workers_and_pinned_memory():
    from cl_hres.cli.app import _build_parser, _config_from_args
    from cl_hres.data.loaders import loader_kwargs

    config = _config_from_args(_build_parser().parse_args(["run", *_gpu_recipe_args()]))
    assert (config.benchmark, config.device, config.bf16) == ("split-cifar100", "cuda", True)
    assert config.experiences in (None, 10) and config.fwt_reference is False
    settings = resolve_loader_settings(
        config.num_workers, device=config.device, kind="pil", cores=16
    )
    assert settings.num_workers >= 4 and settings.pin_memory and settings.persistent_workers
    kwargs = loader_kwargs(
        config.device,
        **dict(
            zip(("num_workers", "pin_memory", "persistent"), settings.strategy_kwargs().values())
        ),
    )
    assert kwargs["pin_memory"] and kwargs["worker_init_fn"] is init_worker
