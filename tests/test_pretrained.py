"""The shipped pretrained backbone, the data path resolved from pretrained configs, and the
published protocol's code path (CIFAR-100 at 224 px, an IN-21k tagged ViT, --weights)."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_hres.cli.app import main
from cl_hres.nn.backbones import SHIPPED_BACKBONE, create_backbone, shipped_card

# Forward-transfer references double a run; tests/test_forward_transfer.py covers them.
FAST = ["--epochs", "1", "--no-progress", "--no-fwt-reference"]


def _results(path):
    return json.loads((path / "results.json").read_text())


def test_shipped_backbone_loads_offline_by_name():
    import timm
    from safetensors.torch import load_file

    from cl_hres.nn import backbones

    card = shipped_card()
    assert card is not None, "cl_hres/pretrained/fmnist.json is missing"
    backbones.register_shipped_backbone()
    model = timm.create_model(SHIPPED_BACKBONE, pretrained=True)  # like any timm tag
    path = backbones._PRETRAINED_DIR / "fmnist.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["provenance"]["sha256"]
    saved = load_file(str(path))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    cfg = model.pretrained_cfg
    assert list(cfg["mean"]) == card["pretrained_cfg"]["mean"]
    assert list(cfg["input_size"]) == [1, 28, 28]
    # The card says what the weights are worth, and how they were made.
    prov = card["provenance"]
    assert 0 < prov["test_accuracy"] <= 1 and len(prov["history"]) == prov["epochs"]
    assert card["provenance"]["command"].startswith("python scripts/pretrain_fmnist.py")


def test_shipped_backbone_is_package_data():
    """pip install brings the weights: setup.cfg declares them as package data."""
    import configparser
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    patterns = cfg["options.package_data"]["cl_hres"]
    assert "pretrained/*.safetensors" in patterns and "pretrained/*.json" in patterns


def test_default_run_uses_the_shipped_pretrained_backbone(tiny_run):
    res = _results(tiny_run.out)
    assert res["backbone"]["name"] == SHIPPED_BACKBONE
    assert res["backbone"]["weights"] == "shipped with cl-hres"
    assert res["backbone"]["sha256"] == shipped_card()["provenance"]["sha256"]
    data_cfg = res["data_config"]
    assert data_cfg["input_size"] == [1, 28, 28]  # 8×8 digits resized to the backbone's size
    assert data_cfg["mean"] == shipped_card()["pretrained_cfg"]["mean"]


def test_random_init_backbone_stays_available(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--experiences", "2", "--no-pretrained", *FAST]) == 0
    assert _results(out)["backbone"]["weights"] == "random (seeded)"


@pytest.mark.parametrize("layout", ["grey28", "rgb32"])
def test_npz_of_any_size_runs_with_default_flags(tmp_path, layout):
    rng = np.random.default_rng(0)
    if layout == "grey28":  # MNIST-like: N×H×W uint8
        x_tr, x_te = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (40, 20))
    else:  # CIFAR-like: N×H×W×3 floats in [0, 1]
        x_tr, x_te = (rng.random((n, 32, 32, 3), dtype=np.float32) for n in (40, 20))
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x_tr, y_train=np.arange(40) % 4, x_test=x_te, y_test=np.arange(20) % 4)
    out = tmp_path / "run"
    args = ["run", "--benchmark", str(path), "--experiences", "2", "--out", str(out), *FAST]
    assert main(args) == 0
    assert _results(out)["data_config"]["input_size"] == [3 if layout == "rgb32" else 1, 28, 28]


def _write_cifar100(root, per_class: int = 1, seed: int = 0) -> dict[str, str]:
    """A tiny CIFAR-100 in torchvision's on-disk layout (the python pickles).

    Returns:
        The md5 of each file, for the loader's test hook ``datasets._CIFAR_MD5`` (these
        are not the official files, which alone pass the loader's checksums).
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        entry = {"data": data, "fine_labels": labels, "coarse_labels": [c // 5 for c in labels]}
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"class{c}" for c in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return {
        f: hashlib.md5((folder / f).read_bytes()).hexdigest() for f in ("train", "test", "meta")
    }


class _MakesDirectory:
    """Unpickling this runs ``os.mkdir(path)``: what a hostile "CIFAR" file could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.path),)


def test_cifar100_files_that_are_not_the_official_ones_are_refused_unopened(tmp_path, capsys):
    """The files are unpickled: only torchvision's checksums (the official files) load."""
    _write_cifar100(tmp_path / "data")
    marker = tmp_path / "unpickled"
    (tmp_path / "data" / "cifar-100-python" / "train").write_bytes(
        pickle.dumps(_MakesDirectory(marker))
    )
    out = tmp_path / "run"
    args = ["run", "--benchmark", "split-cifar100", "--data-root", str(tmp_path / "data")]
    assert main([*args, "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "cifar-100-python" in err[0] and "checksum does not match" in err[0]
    assert "unpickled" in err[0]
    assert not marker.exists() and not out.exists()


def test_cifar100_checksums_are_torchvisions():
    from torchvision.datasets import CIFAR100

    from cl_hres.data import datasets

    assert datasets._CIFAR_MD5 is None  # the test hook is off outside the tests that set it
    table = datasets._cifar_md5()
    assert table == {
        "train": CIFAR100.train_list[0][1],
        "test": CIFAR100.test_list[0][1],
        "meta": CIFAR100.meta["md5"],
    }


@pytest.mark.slow
def test_cifar100_protocol_at_224_with_in21k_weights(tmp_path, monkeypatch):
    """The GPU user's path (split-cifar100, an augreg_in21k tag, --weights), minus the download."""
    from safetensors.torch import save_file

    from cl_hres.data import datasets

    name = "vit_tiny_patch16_224.augreg_in21k"
    torch.manual_seed(0)
    # timm's layout for that tag, 1 of its 12 blocks deep to keep the suite fast on 2 cores.
    state = create_backbone(name, depth=1).state_dict()
    weights = tmp_path / "vit_tiny_in21k.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("backbone_kwargs: {depth: 1}\n")
    # The fake files' checksums stand in for the official ones: the verification still runs.
    monkeypatch.setattr(datasets, "_CIFAR_MD5", _write_cifar100(tmp_path / "data"))
    out = tmp_path / "cifar"
    args = [
        "run", "--benchmark", "split-cifar100", "--data-root", str(tmp_path / "data"),
        "--backbone", name, "--weights", str(weights), "--config", str(recipe),
        "--experiences", "2", "--batch-size", "16", "--eval-batch-size", "50",
        "--out", str(out), *FAST,
    ]  # fmt: skip
    assert main(args) == 0
    res = _results(out)
    data_cfg = res["data_config"]
    assert data_cfg["input_size"] == [3, 224, 224]
    assert data_cfg["mean"] == [0.5, 0.5, 0.5] and data_cfg["std"] == [0.5, 0.5, 0.5]
    assert data_cfg["augment"] == "crop-flip" and data_cfg["interpolation"] == "bicubic"
    assert res["backbone"]["weights"] == "file"
    assert res["backbone"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert len(res["accuracy_matrix"]) == 2


def test_offline_pretrained_fails_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # never reachable
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    out = tmp_path / "run"
    args = ["run", "--backbone", "vit_tiny_patch16_224.augreg_in21k", "--out", str(out), *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights" in err[0] and "not cached" in err[0]
    assert not out.exists()


def test_card_beside_weights_sets_the_input_pipeline(tmp_path, capsys):
    """--weights FILE with FILE.json (what pretrain_fmnist.py writes): its mean/std are used."""
    import shutil

    from timm.data import resolve_model_data_config

    from cl_hres.nn.backbones import _PRETRAINED_DIR

    weights = tmp_path / "mine.safetensors"
    shutil.copy(_PRETRAINED_DIR / "fmnist.safetensors", weights)
    plain = resolve_model_data_config(create_backbone(SHIPPED_BACKBONE, weights=weights))
    assert plain["mean"] == tuple(shipped_card()["pretrained_cfg"]["mean"])
    card = {"pretrained_cfg": {"mean": [0.25], "std": [0.5], "num_classes": 5}}
    weights.with_suffix(".json").write_text(json.dumps(card))
    model = create_backbone(SHIPPED_BACKBONE, weights=weights)
    cfg = resolve_model_data_config(model)
    assert cfg["mean"] == (0.25,) and cfg["std"] == (0.5,)
    assert model.num_classes == 0  # the card's head size is not the backbone's business
    # A broken card is bad input: one line naming it, exit 2, nothing written.
    weights.with_suffix(".json").write_text("{not json")
    out = tmp_path / "run"
    assert main(["run", "--weights", str(weights), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mine.json" in err[0] and "pretrained_cfg" in err[0]
    assert not out.exists()
    # Values timm would trip over later (a traceback, or infinite inputs) are refused too.
    from cl_hres.errors import DataError
    from cl_hres.nn.backbones import weights_card

    for bad in (
        {"mean": 0.5},
        {"mean": ["a"]},
        {"std": [0]},
        {"input_size": 28},
        {"interpolation": "nope"},
        {"crop_pct": 1.5},
    ):
        weights.with_suffix(".json").write_text(json.dumps({"pretrained_cfg": bad}))
        with pytest.raises(DataError, match=next(iter(bad))):
            weights_card(weights)


def _write_idx(path, array: np.ndarray) -> None:
    import gzip

    magic = (0x08 << 8) | array.ndim  # unsigned bytes
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_pretraining_script_holds_out_a_stream_and_trains_on_chosen_classes(tmp_path):
    """scripts/pretrain_fmnist.py --classes/--holdout/--stream-npz on fake IDX files: the
    stream's training images are never among those pretrained on, and the card names it."""
    import importlib.util

    from cl_hres.data.datasets import load_npz

    spec = importlib.util.spec_from_file_location(
        "pretrain_fmnist", Path(__file__).parents[1] / "scripts" / "pretrain_fmnist.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(0)
    n_train, n_test = 300, 60
    # Every training image carries its index in its first two pixels: images are unique.
    train_x = rng.integers(0, 256, (n_train, 28, 28))
    train_x[:, 0, 0], train_x[:, 0, 1] = np.arange(n_train) // 256, np.arange(n_train) % 256
    data = tmp_path / "fmnist"
    data.mkdir()
    _write_idx(data / script.FILES["train_x"], train_x)
    _write_idx(data / script.FILES["train_y"], np.arange(n_train) % 10)
    _write_idx(data / script.FILES["test_x"], rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(data / script.FILES["test_y"], np.arange(n_test) % 10)
    stream = tmp_path / "stream.npz"
    args = ["--data-dir", str(data), "--val", "40", "--holdout", "100", "--threads", "1"]
    out = tmp_path / "bb"
    argv = [*args, "--stream-npz", str(stream), "--classes", "0,1", "--epochs", "1"]
    assert script.main([*argv, "--out", str(out), "--batch-size", "16"]) == 0
    held = np.load(stream)
    assert held["x_train"].shape == (100, 28, 28) and held["x_test"].shape == (n_test, 28, 28)
    assert sorted(set(held["y_train"].tolist())) == list(range(10))  # every class
    card = json.loads((out / "fmnist.json").read_text())
    assert card["pretrained_cfg"]["num_classes"] == 2
    assert "classes [0, 1]" in card["provenance"]["data"]
    # The pretraining pool, rebuilt as the script draws it: disjoint from the stream.
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    pool = {int(i) for i in perm[140:]}
    held_ids = {int(a) * 256 + int(b) for a, b in held["x_train"][:, 0, :2]}
    assert len(held_ids) == 100 and not held_ids & pool
    # ...and what the script trained on is that pool's images of classes 0 and 1.
    trained = sum(1 for i in pool if i % 10 in (0, 1))
    assert f"classes [0, 1]: {trained} training images" in card["provenance"]["data"]
    # The stream loads as a cl-hres benchmark.
    assert load_npz(stream).num_classes == 10
    # Bad options: one line, exit 2, nothing written (the stream is written first when
    # the options are good, so a bad --classes must stop before it).
    stream.unlink()
    for bad in (["--classes", "a"], ["--classes", "12"], ["--classes=-1"], ["--holdout=-5"]):
        with pytest.raises(SystemExit) as exc:
            script.main([*argv, "--out", str(out), *bad])
        assert exc.value.code == 2, bad
        assert not stream.exists()
