"""Class order, experience sizes, domain streams, the balanced head and split-domains."""

import json
import shutil

import numpy as np
import pytest
import torch
from _helpers import make_vit

from cl_hres.cli.app import main
from cl_hres.data.class_order import class_order, domain_experiences, experience_sizes
from cl_hres.errors import ConfigError, DataError
from cl_hres.nn.heads import RidgeHead

TINY = ["--epochs", "1", "--no-fwt-reference", "--num-workers", "0"]


def test_class_orders_seeded_fixed_list_and_file(tmp_path):
    assert class_order("fixed", 5, seed=3) == [0, 1, 2, 3, 4]
    seeded = class_order("seeded", 10, seed=1)
    assert sorted(seeded) == list(range(10)) and seeded != list(range(10))
    assert class_order("seeded", 10, seed=1) == seeded
    assert class_order("2,0,1", 3, seed=0) == [2, 0, 1]
    assert class_order([1, 0], 2, seed=0) == [1, 0]
    f = tmp_path / "order.txt"
    f.write_text("3 1\n0\n2\n")
    assert class_order(str(f), 4, seed=0) == [3, 1, 0, 2]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0,1,1", "repeated [1]"),
        ("0,1", "missing [2]"),
        ("0,1,2,7", "outside 0..2"),
        ("0,x,2", "must hold integers"),
        ("no-such-file.txt", "no such file"),
    ],
)
def test_a_bad_class_order_is_named(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        class_order(spec, 3, seed=0)


def test_initial_classes_and_increment_give_the_published_layouts():
    assert experience_sizes(100, initial=50, increment=10) == [50] + [10] * 5  # B50Inc10
    assert experience_sizes(100, increment=10) == [10] * 10  # B0Inc10
    assert experience_sizes(10, initial=4, increment=4) == [4, 4, 2]
    assert experience_sizes(10, experiences=3) == [4, 3, 3]
    with pytest.raises(ConfigError, match="give 6 experiences"):
        experience_sizes(100, experiences=5, initial=50, increment=10)
    with pytest.raises(ConfigError, match="initial_classes must be in 1..10"):
        experience_sizes(10, initial=11)


def test_domain_experiences_follow_the_file_order_of_domains():
    domains = [1, 1, 0, 0, 2, 2]  # domain 1 comes first in the file
    order, sizes = domain_experiences([5, 4, 3, 2, 1, 0], domains)
    assert order == [1, 0, 3, 2, 5, 4] and sizes == [2, 2, 2]


def _domain_npz(path, sizes=(40, 40, 6)):
    """Three domains of two classes, the last one small; class c is a bright square at c."""
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for c in range(6):
        n = sizes[c // 2]
        img = rng.integers(0, 40, (n + 10, 14, 14), dtype=np.uint8)
        img[:, c * 2 : c * 2 + 3, c * 2 : c * 2 + 3] = 255
        xs.append(img)
        ys.append(np.full(n + 10, c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    test = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(6)])
    train = np.setdiff1d(np.arange(len(y)), test)
    np.savez(
        path,
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        domain_of_class=np.array([2, 2, 0, 0, 1, 1]),
        domain_names=np.array(["a", "b", "c"]),
    )
    return path


def test_by_domain_run_records_order_and_domains(tmp_path):
    data = _domain_npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    args = ["run", "--benchmark", str(data), "--experiences", "by-domain", "--strategy"]
    assert main([*args, "linear", "--class-order", "fixed", "--out", str(out), *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    # Domain 2 ("c") is first in the file, so classes 0 and 1 form the first experience.
    assert res["class_order"] == [0, 1, 2, 3, 4, 5]
    assert res["classes_per_experience"] == [2, 2, 2]
    assert res["experience_domains"] == ["c", "a", "b"]
    assert res["config"]["experiences"] == "by-domain"


def test_class_order_errors_are_one_line(tmp_path, capsys):
    data = _domain_npz(tmp_path / "d.npz")
    out = tmp_path / "bad"
    argv = ["run", "--benchmark", str(data), "--class-order", "0,1,2", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a permutation of the 6 classes" in err
    assert not out.exists()
    assert main(["run", "--experiences", "by-domain", "--out", str(out)]) == 2
    assert "domain_of_class" in capsys.readouterr().err


def test_balanced_head_keeps_a_small_experience():
    """Two large classes, then two with 1% of the images: the image-weighted ridge head
    never predicts the small ones; weighting every class equally recovers them."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=g)

    def sample(c: int, n: int) -> torch.Tensor:
        return means[c] + torch.randn(n, 16, generator=g)

    recall = {}
    for balanced in (False, True):
        head = RidgeHead(16, balanced=balanced)
        for classes, n in (((0, 1), 2000), ((2, 3), 20)):
            x = torch.cat([sample(c, n) for c in classes])
            y = torch.cat([torch.full((n,), c) for c in classes])
            head.update(x, y)
            head.fit()
        xt = torch.cat([sample(c, 500) for c in range(4)])
        pred = head(xt).argmax(1).view(4, 500)
        recall[balanced] = [(pred[c] == c).float().mean().item() for c in range(4)]
    assert max(recall[False][2:]) < 0.2
    assert min(recall[True]) > 0.9


def test_balanced_head_equals_the_head_of_a_balanced_stream():
    """Weights m/n_c on unequal classes give the head fitted on equal classes' moments."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 20 + [1] * 10)
    head = RidgeHead(5, ridge=1e-3, balanced=True)
    head.update(x.float(), y)
    head.fit()
    twice = torch.cat([x[:20], x[20:], x[20:]])  # class 1 repeated: both classes 20 images
    ref = RidgeHead(5, ridge=1e-3)
    ref.update(twice.float(), torch.tensor([0] * 20 + [1] * 20))
    ref.fit()
    # m = 15 (mean class size) instead of 20 scales G, sums and counts alike.
    assert torch.allclose(head.weight, ref.weight, atol=1e-5)
    assert torch.allclose(head.bias, ref.bias, atol=1e-5)


def test_simplecil_and_ranpac_use_their_heads(tmp_path):
    from cl_hres.run.config import RunConfig

    out = tmp_path / "simplecil"
    assert (
        main(["run", "--strategy", "simplecil", "--experiences", "2", "--out", str(out), *TINY])
        == 0
    )
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert (cfg["head"], cfg["ridge_projection"]) == ("ncm", 0)
    # ranpac is aper (tests/test_first_session.py) with this head; the projected ridge
    # head is tested in tests/test_heads_and_analysis.py, hres-routed runs it end to end.
    ranpac = RunConfig(strategy="ranpac")
    ranpac.resolve_strategy_defaults()
    assert (ranpac.head, ranpac.ridge_projection) == ("ridge", 2000)


def test_split_domains_build_splits_fonts_and_checks_its_checksum(tmp_path, monkeypatch):
    from cl_hres.data import domains

    fonts = domains._font_families("AB", domains.FONT_DIRS)
    if len(fonts) < 2:
        pytest.skip("fewer than two font families with Latin letters installed")
    fashion = tmp_path / "fmnist"
    fashion.mkdir()
    _write_idx(fashion / "t10k-images-idx3-ubyte.gz", np.zeros((40, 28, 28), np.uint8) + 7)
    _write_idx(fashion / "t10k-labels-idx1-ubyte.gz", np.repeat(np.arange(10, dtype=np.uint8), 4))
    monkeypatch.setattr(domains, "TRAIN_PER_CLASS", dict(domains.TRAIN_PER_CLASS, fashion=2))
    monkeypatch.setattr(domains, "TEST_PER_CLASS", dict(domains.TEST_PER_CLASS, fashion=1))
    folder = tmp_path / "root" / "split-domains"
    domains.build_split_domains(
        folder,
        fashion_dir=fashion,
        scripts={"latin": "AB"},
        train_per_class={"latin": 3},
        test_per_class={"latin": 2},
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["domains"] == ["digits", "fashion", "latin"]
    assert not set(manifest["fonts"]["latin"]["train"]) & set(manifest["fonts"]["latin"]["test"])
    data = domains.load_split_domains(tmp_path / "root")
    assert data.num_classes == 22 and data.domain_of_class == [0] * 10 + [1] * 10 + [2] * 2
    assert data.domain_names == ["digits", "fashion", "latin"]
    assert data.train.images.shape[1:] == (1, 28, 28)
    with open(folder / "split-domains.npz", "r+b") as f:  # flip one byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataError, match="checksum does not match"):
        domains.load_split_domains(tmp_path / "root")


def _write_idx(path, array):
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_expert_views_read_one_expert_each_and_old_views_never_move():
    """View v is the backbone with expert v-1 alone; training a new expert leaves the
    earlier views' features (and with them their prototypes) exactly where they were."""
    from cl_hres.nn.views import ExpertViewsViT

    model = ExpertViewsViT(make_vit(), head="ncm")
    x = torch.rand(4, 1, 8, 8)
    model.begin_experience([([0, 1], [0])])
    with torch.no_grad():
        for bank in model.banks:  # expert 0 non-zero, as after training
            bank.up["expert0"].weight.normal_()
    model.eval()
    before = model.features(x)
    model.begin_experience([([2, 3], [0])])
    with torch.no_grad():
        for bank in model.banks:
            bank.up["expert1"].weight.normal_()
    after = model.features(x)
    width = model.backbone.num_features
    assert after.shape[1] == 3 * width
    torch.testing.assert_close(after[:, : 2 * width], before, rtol=0, atol=0)
    with model.view(2):
        alone = model.backbone_features(x)
    for bank in model.banks:
        bank.down.pop("expert0")
        bank.up.pop("expert0")
    torch.testing.assert_close(model.backbone_features(x), alone)  # expert 1 alone


def _layout_tree(root, layout, names):
    from PIL import Image

    for split in ("train", "test"):
        for i, name in enumerate(names):
            folder = root / layout.folder / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(folder / "0.png")


@pytest.mark.parametrize("name", ["imagenet-a", "cub-200", "objectnet", "omnibenchmark", "vtab"])
def test_ptm_benchmark_layouts_read_their_folders(tmp_path, name):
    """Each PTM-CIL layout: a one-line error naming the folder it expects, its class
    count checked, and its default experiences (VTAB: its five domains, in order)."""
    from cl_hres.data.benchmarks import BENCHMARKS, FOLDER_LAYOUTS, load_benchmark_data
    from cl_hres.data.streams import stream_layout

    layout = FOLDER_LAYOUTS[name]
    with pytest.raises(DataError, match=f"expected {tmp_path / layout.folder}/train/<class>"):
        load_benchmark_data(name, data_root=tmp_path)
    per_domain = layout.classes // max(layout.domains, 1)
    names = [f"d{c // per_domain}_class{c:03d}" for c in range(layout.classes)]
    _layout_tree(tmp_path, layout, names)
    data = load_benchmark_data(name, data_root=tmp_path)
    assert data.num_classes == layout.classes
    order, sizes = stream_layout(data, experiences=BENCHMARKS[name].experiences, seed=0)
    if layout.domains:
        assert data.domain_names == [f"d{d}" for d in range(5)] and sizes == [10] * 5
        # The domains in the order the data ships (classes within one: the seeded order).
        assert [c // 10 for c in order] == [d for d in range(5) for _ in range(10)]
    else:
        assert sizes == [layout.classes // 10] * 10
    for split in ("train", "test"):
        shutil.rmtree(tmp_path / layout.folder / split / names[-1])
    with pytest.raises(DataError, match=f"{layout.classes - 1} class folders with images"):
        load_benchmark_data(name, data_root=tmp_path)


def test_vtab_runs_by_domain_from_the_command_line(tmp_path, capsys):
    from cl_hres.data.benchmarks import FOLDER_LAYOUTS

    argv = ["run", "--benchmark", "vtab", "--data-root", str(tmp_path), "--strategy", "simplecil"]
    assert main([*argv, "--out", str(tmp_path / "missing"), *TINY]) == 2
    assert "vtab not found: expected" in capsys.readouterr().err
    domains = ["resisc45", "dtd", "pets", "eurosat", "flowers"]
    names = sorted(f"{d}_{c}" for d in domains for c in range(10))
    _layout_tree(tmp_path, FOLDER_LAYOUTS["vtab"], names)
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out), *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["classes_per_experience"] == [10] * 5
    assert res["experience_domains"] == sorted(domains)
