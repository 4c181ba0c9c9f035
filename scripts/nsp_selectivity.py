"""How selective can an input-space null space be? A measurement on VALIDATION data.

Runs one strategy with experts under NSP (default ``hres-nsp`` on the embedded default)
and records, per experience and adapted block, the second moment of the block inputs of
that experience alone (``Σ_new``) and of all earlier ones (``Σ_old``), token groups
normalised by their trace as for the projector. The generalised eigenvalues μ of
``Σ_new v = μ Σ_old v`` say how much more energy the new experience has than the old ones
along any input direction v. An expert's ``down`` map reads its input linearly, and GELU
is linear near 0, so along a direction with ratio μ the expert's first-order effect on old
inputs is at least ``1/√μ`` times its effect on new ones. When even the largest μ is
small, no threshold can give an expert plasticity without moving old features: the
directions it may learn in carry old inputs nearly as strongly as new ones.

Example (the figures quoted in docs/results.md):
    python scripts/nsp_selectivity.py --out results/nsp-selectivity --seed 0
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from cl_hres import _warnings
from cl_hres.cli.options import OneLineParser
from cl_hres.errors import ConfigError
from cl_hres.fileio import atomic_write_text
from cl_hres.nsp import guard as null_space
from cl_hres.run.config import RunConfig
from cl_hres.run.prepare import prepare
from cl_hres.run.runner import execute

_RIDGE = 1e-8  # relative to the mean eigenvalue of Σ_old, so the Cholesky factor exists


def selectivity(old: torch.Tensor, new: torch.Tensor) -> list[float]:
    """Generalised eigenvalues of (Σ_new, Σ_old), largest first: those of L⁻¹Σ_new L⁻ᵀ."""
    eye = torch.eye(old.shape[0], dtype=old.dtype)
    chol = torch.linalg.cholesky(old + _RIDGE * old.diagonal().mean() * eye)
    half = torch.linalg.solve_triangular(chol, new, upper=False)  # L⁻¹Σ_new
    whitened = torch.linalg.solve_triangular(chol, half.T, upper=False)  # L⁻¹Σ_new L⁻ᵀ
    return torch.linalg.eigvalsh((whitened + whitened.T) / 2).flip(0).tolist()


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", default="{}", help="JSON: options (default: the shipped ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation", type=float, default=0.2, help="train fraction held out")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    _warnings.show_as_one_line()  # cl-hres warnings as the CLI prints them
    given = p.json_option("--set", args.set)
    if not isinstance(given, dict):
        p.error("--set must be a JSON object of option -> value")
    options = {"strategy": "hres-nsp", "fwt_reference": False, **given}
    try:
        cfg = RunConfig.from_dict(dict(options, seed=args.seed, validation=args.validation))
    except ConfigError as exc:
        p.error(str(exc))
    passes: list[list[torch.Tensor]] = []  # per experience: each bank's Σ increment
    accumulators = []  # normalise token groups exactly as the projector does
    collecting = null_space.NullSpaceGuard.collecting

    @contextlib.contextmanager
    def recording_increments(guard):
        accumulators[:] = [s.covariance for s in guard.states]
        before = [s.covariance.sums.clone() for s in guard.states]
        with collecting(guard):
            yield
        passes.append([(s.covariance.sums - b).cpu() for s, b in zip(guard.states, before)])

    null_space.NullSpaceGuard.collecting = recording_increments
    try:
        execute(
            prepare(cfg), args.out / "runs" / f"seed{args.seed}", overwrite=True, progress=False
        )
    finally:
        null_space.NullSpaceGuard.collecting = collecting

    def normalised(b: int, sums: torch.Tensor) -> torch.Tensor:
        return accumulators[b].matrix(sums.to(accumulators[b].sums.device)).cpu()

    rows = []  # one collecting pass per experience: pass t is experience t + 1
    for t in range(1, len(passes)):
        mus = [
            selectivity(
                normalised(b, sum(passes[j][b] for j in range(t))), normalised(b, passes[t][b])
            )
            for b in range(len(passes[t]))
        ]
        rows.append({"experience": t + 1, "mu": mus})
    # The spectrum the threshold rules cut: old inputs after the last experience.
    spectra = []
    for b in range(len(passes[0])):
        total = normalised(b, sum(p[b] for p in passes))
        evals = torch.linalg.eigvalsh(total).flip(0).clamp_min(1e-300)
        spectra.append((evals / evals[0]).log10().tolist())
    atomic_write_text(
        args.out / "selectivity.json",
        json.dumps({"options": options, "rows": rows, "log10_relative_spectra": spectra}),
    )
    lines = [
        f"Options {json.dumps(options)}, seed {args.seed}, {args.validation:.0%} validation.",
        "",
        "Largest / 4th / 16th generalised eigenvalue μ of (Σ_new, Σ_old) per block, for "
        "experiences 2 to 5 (1 has no old inputs):",
        "",
        "| experience | " + " | ".join(f"block {b}" for b in range(len(passes[0]))) + " |",
        "|---" * (len(passes[0]) + 1) + "|",
    ]
    for row in rows:
        cells = [" / ".join(f"{m[i]:.3g}" for i in (0, 3, 15) if i < len(m)) for m in row["mu"]]
        lines.append(f"| {row['experience']} | " + " | ".join(cells) + " |")
    d = len(spectra[0])
    picks = sorted({min(d - 1, round(q * (d - 1))) for q in (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1)})
    lines += [
        "",
        "log10(λ / λ_max) of every block's input second moment (all experiences), at ranks "
        + ", ".join(str(i + 1) for i in picks)
        + f" of {d}:",
        "",
        "| block | " + " | ".join(f"#{i + 1}" for i in picks) + " |",
        "|---" * (len(picks) + 1) + "|",
    ]
    for b, spectrum in enumerate(spectra):
        cells = [f"{spectrum[i]:.1f}" if spectrum[i] > -16 else "< -16" for i in picks]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    atomic_write_text(args.out / "selectivity.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
