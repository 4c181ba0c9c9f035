import contextlib
import hashlib
import io
import os
from pathlib import Path
from typing import NamedTuple

import pytest

# Under pytest-xdist every worker gets one thread of each pool (torch's OpenMP, BLAS),
# set before torch loads: 2 workers with 2 spinning threads each would fight over 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _helpers import TINY, make_vit

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying the hub
# The suite's budget is set on 2 cores: 2 threads in one process, or 1 in each of
# pytest-xdist's workers (-n 2); OMP_NUM_THREADS (e.g. 1 on a shared machine) wins.
_threads = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", _threads)))


class TinyRun(NamedTuple):
    """A finished run shared by every test of one pytest run: read it, copy it to change it."""

    out: Path
    stdout: str


@pytest.fixture
def vit():
    return make_vit()


def _digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _tiny_run(tmp_path_factory, *extra: str):
    from cl_hres.cli.app import main

    out = tmp_path_factory.mktemp("tiny") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["run", "--out", str(out), *TINY, *extra]) == 0
    before = _digest(out)
    yield TinyRun(out, stdout.getvalue())
    # Shared means read-only: a test that wrote into it would make others order-dependent.
    assert _digest(out) == before, f"a test changed the shared run {out}"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``cl-hres run`` with the defaults (hres-nsp, class-incremental) and :data:`TINY`."""
    yield from _tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_task_run(tmp_path_factory):
    """As :func:`tiny_run`, task-incremental."""
    yield from _tiny_run(tmp_path_factory, "--scenario", "task")
