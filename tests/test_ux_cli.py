"""Help text, boolean flags, YAML numbers and fast validation of the command line."""

import dataclasses

import pytest

from cl_hres.cli import app as cli
from cl_hres.run.config import RunConfig
from cl_hres.run.recipes import load_yaml_config


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_run_help_lists_groups_and_choices(capsys):
    text = _help(capsys, "run")
    for title in (
        "data and stream:",
        "backbone:",
        "method:",
        "null-space projection",
        "evaluation head and metrics:",
        "training:",
        "output:",
    ):
        assert title in text, title
    for name, line in cli.strategy_help().items():
        assert f"{name}  " in text and line in text, name
    for name in ("split-digits", "split-cifar100", "imagenet-r", "FILE.npz"):
        assert name in text
    for name in ("relative", "energy", "ratio", "ridge", "ncm"):
        assert f"  {name}  " in text
    assert "--vpt-deep, --no-vpt-deep" in text and "--bf16, --no-bf16" in text
    assert "--pretrained, --no-pretrained" in text
    # Every option states its default: join each option's help lines, then check.
    entries: list[str] = []
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  --"):
            entries.append(line)
        elif line.startswith(" " * 8) and entries:
            entries[-1] += line
    no_default = ("--out", "--overwrite", "--resume", "--no-progress", "--config")
    assert len(entries) > 30
    for entry in entries:
        if not entry.strip().startswith(no_default):
            assert "(default: " in entry, entry


def test_top_level_compare_bench_analyze_help(capsys):
    top = _help(capsys)
    assert "`" not in top and "run" in top and "compare" in top
    assert "hres-nsp, hres" in _help(capsys, "compare")
    bench = _help(capsys, "bench")
    assert "(default: tiny)" in bench and "(default: 5)" in bench and "(default: auto)" in bench
    assert "(default: 256)" in _help(capsys, "analyze")


def test_choice_tables_match_the_implementations():
    from cl_hres.data.benchmarks import BENCHMARKS

    assert set(BENCHMARKS) <= set(cli.BENCHMARK_HELP)


def test_every_config_field_has_an_option():
    flags = set(cli._RUN_FIELDS)
    missing = {f.name for f in dataclasses.fields(RunConfig)} - flags - {"backbone_kwargs"}
    assert not missing


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {"vpt_deep": None, "bf16": None, "pretrained": None}),
        (["--vpt-deep", "--bf16", "--pretrained"], {"vpt_deep": True, "bf16": True}),
        (["--no-vpt-deep", "--no-bf16", "--no-pretrained"], {"vpt_deep": False, "bf16": False}),
    ],
)
def test_booleans_are_flags(argv, expected):
    args = cli._build_parser().parse_args(["run", "--out", "o", *argv])
    for key, value in expected.items():
        assert getattr(args, key) is value


def test_no_pretrained_overrides_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pretrained: true\nvpt_deep: false\n")
    argv = ["run", "--config", str(recipe), "--no-pretrained", "--vpt-deep", "--out", "o"]
    config = cli._config_from_args(cli._build_parser().parse_args(argv))
    assert config.pretrained is False and config.vpt_deep is True
    default = cli._config_from_args(cli._build_parser().parse_args(["run", "--out", "o"]))
    assert default.pretrained is RunConfig().pretrained


def test_boolean_flags_take_no_value(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--vpt-deep", "false", "--out", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: false" in err[0]


def test_yaml_exponent_numbers_are_floats(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("nsp_threshold: 1e-8\nlr: 3E-4\nweight_decay: 1.0e-5\nrank: 16\n")
    values = load_yaml_config(recipe)
    assert values == {"nsp_threshold": 1e-8, "lr": 3e-4, "weight_decay": 1e-5, "rank": 16}
    assert RunConfig.from_dict(values).nsp_threshold == 1e-8


def test_compare_checks_names_before_heavy_imports(tmp_path, capsys):
    import subprocess
    import sys

    code = (
        "import sys; from cl_hres.cli.app import main; "
        f"code = main(['compare', '--strategies', 'hres,vtp', '--out', {str(tmp_path)!r}]); "
        "print(code, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False"]
    assert "finetune, hres, hres-nsp" in proc.stderr
