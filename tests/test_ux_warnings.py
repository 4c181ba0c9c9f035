"""Third-party warnings are filtered at their source; bad input is one stderr line."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from cl_hres import _warnings


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def _fake_qpsolvers(root: Path) -> Path:
    """qpsolvers as a fresh install without solvers behaves: it warns on import.

    Same module (``qpsolvers.solvers``), category and message as qpsolvers 4.13.0.
    """
    pkg = root / "qpsolvers"
    (pkg / "solvers").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from .solvers import available_solvers\n"
        "def solve_qp(*args, **kwargs):\n    raise RuntimeError('no solver')\n"
    )
    (pkg / "solvers" / "__init__.py").write_text(
        "import warnings\navailable_solvers = []\n"
        "warnings.warn('no QP solver found on your system, you can install solvers from PyPI "
        "by ``pip install qpsolvers[open_source_solvers]``')\n"
    )
    return root


def test_bad_data_in_a_fresh_process_is_one_stderr_line(tmp_path):
    # A test split missing a training class: found after Avalanche (hence qpsolvers) has
    # been imported, once the stream is built.
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(4), 6), np.repeat(np.arange(3), 3)
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.random((24, 8, 8)),
        y_train=y_train,
        x_test=rng.random((9, 8, 8)),
        y_test=y_test,
    )
    fake = _fake_qpsolvers(tmp_path / "site")
    env = _clean_env(PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    check = subprocess.run(
        [sys.executable, "-c", "import qpsolvers"], capture_output=True, text=True, env=env
    )
    assert "no QP solver found" in check.stderr  # the fake is what gets imported
    out = tmp_path / "out"
    argv = ["run", "--benchmark", str(tmp_path / "d.npz"), "--experiences", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "cl_hres", *argv, "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cl-hres: error:") and "class 3" in lines[0], lines[0]
    assert not out.exists()


def test_bad_option_in_a_fresh_process_is_one_line_without_torch(tmp_path):
    code = (
        "import sys; from cl_hres.cli.app import main; "
        f"code = main(['run', '--lr', '-1', '--out', {str(tmp_path / 'o')!r}]); "
        "print(code, 'torch' in sys.modules, 'avalanche' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env()
    )
    assert proc.stdout.split() == ["2", "False", "False"]  # validated before heavy imports
    assert proc.stderr.strip().splitlines() == [
        "cl-hres: error: lr must be a finite number > 0, got -1.0"
    ]
    assert not (tmp_path / "o").exists()


def test_known_library_warnings_are_silenced_and_others_kept():
    code = (
        "import warnings, cl_hres, torch\n"
        "from avalanche.training.plugins import EvaluationPlugin\n"
        "EvaluationPlugin(loggers=[])\n"  # 'No loggers specified'
        "torch.nn.Linear(4, 0)\n"  # 'Initializing zero-element tensors is a no-op'
        "warnings.warn('a warning of our own')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert "a warning of our own" in proc.stderr
    assert "No loggers" not in proc.stderr and "zero-element" not in proc.stderr, proc.stderr
    # -W (or PYTHONWARNINGS) goes in front of the filters: everything shows for debugging.
    # Python puts -W's filter first at start-up; the same order, set up in this process:
    import torch

    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")  # what `python -W default` installs
        _warnings.install()
        torch.nn.Linear(4, 0)
    assert any("zero-element" in str(w.message) for w in seen)


def test_filters_name_category_module_and_message():
    for category, module, message in _warnings.KNOWN_WARNINGS:
        assert issubclass(category, Warning) and module and message
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        _warnings.install()
        _warnings.install()  # idempotent
        assert len(warnings.filters) == len(_warnings.KNOWN_WARNINGS)
        warnings.warn("no QP solver found here", UserWarning, stacklevel=1)  # shown
    assert len(seen) == 1


def test_cl_hres_warnings_print_as_one_line(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _warnings.show_as_one_line()
        warnings.warn("an uneven split", _warnings.ClHresWarning, stacklevel=1)
    assert capsys.readouterr().err == "cl-hres: warning: an uneven split\n"


def test_main_gives_the_caller_its_warning_settings_back(tmp_path, capsys):
    from cl_hres.cli.app import main

    show, filters = warnings.showwarning, list(warnings.filters)
    assert main(["run", "--lr", "-1", "--out", str(tmp_path / "o")]) == 2
    assert warnings.showwarning is show and warnings.filters == filters
