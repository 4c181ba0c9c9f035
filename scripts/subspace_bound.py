"""Per-experience feature subspaces (EASE-style expansion): what they could give, on VALIDATION data.

Instead of summing every experience's expert into one residual stream (H-Res, where NSP
must keep old features still), each experience ``k`` gets its own expert trained on that
experience alone, and the head reads the concatenation ``[φ_pre, φ_1, …, φ_T]`` of the
frozen backbone's features and of the backbone run with each expert alone. Old features
never move: expert ``k`` does not touch subspaces ``< k``. The catch is the head: a class
of experience ``j < k`` was never seen through expert ``k``, so an exemplar-free head
lacks its statistics in subspace ``k``. This script measures, on the validation split:

* ``frozen``: ridge on ``φ_pre`` (the ``linear`` strategy);
* ``first-session``: ridge on ``[φ_pre, φ_1]`` (APER; what the shipped H-Res-NSP becomes);
* ``subspaces, exact``: ridge on all subspaces with the statistics of every image seen
  through every expert, which needs the old images (exemplars): an **upper bound** of
  any exemplar-free way to fill the gap;
* ``first-session, cosine head`` and ``subspaces, exact class means, cosine head``:
  EASE's head family (cosine similarity to class prototypes), the latter with the exact
  prototypes its semantic complement estimates;
* ``subspaces, imputed λ``: the exemplar-free fill of learnable drift compensation
  (Gomez-Villa et al., ECCV 2024) applied across subspaces: for old experience ``j``, the
  missing ``φ_k`` is predicted by an affine map of the features it does have
  (``[φ_pre, φ_1..φ_j]``), fitted by ridge (λ relative to the mean eigenvalue) on
  experience ``k``'s images, the only ones seen through both;
* ``subspaces, imputed by the old images' own map``: the same map fitted on the old
  images themselves (needs them; cross-fitted in two halves): is the failure the map's
  transfer from new to old classes, or the affine form?
* ``subspaces, own map fitted on M stored images per class``: the same with an exemplar
  memory of M images per class (their own features exact): does a small memory suffice?
* ``two-stage``: the first-session head picks the experience, then that experience's own
  subspace head (exact: it saw only its own images) picks the class; with how often the
  first stage picks the right experience.

Accuracies are final average accuracies (the mean over experiences of the accuracy on
each experience's validation images), as in ``cl-hres`` runs and ``scripts/sweep.py``.

Example (the figures quoted in docs/results.md):
    python scripts/subspace_bound.py --seeds 0,1,2,3 --out results/subspace-bound/split-digits
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cl_hres import _warnings
from cl_hres.cli.options import OneLineParser
from cl_hres.errors import ClHresError
from cl_hres.fileio import atomic_write_text
from cl_hres.nn.heads import NCMHead, RidgeHead, StatisticsHead
from cl_hres.reporting.tables import mean_std
from cl_hres.run.config import RunConfig
from cl_hres.run.prepare import Prepared, prepare

IMPUTE_RIDGES = (1e-4, 1e-2, 1.0)
EXEMPLARS = (20, 50)  # stored images per class for the exemplar-memory variant
EXEMPLAR_RIDGE = 1e-2


@dataclasses.dataclass
class Features:
    """Per experience ``j``: ``pre[j]`` (N_j, D), ``sub[k][j]`` (N_j, D) and ``labels[j]``."""

    pre: list[torch.Tensor]
    sub: list[list[torch.Tensor]]
    labels: list[torch.Tensor]


def _accuracy(
    train: list[tuple[torch.Tensor, torch.Tensor]],
    test: list[tuple[torch.Tensor, torch.Tensor]],
    head_type: type[StatisticsHead] = RidgeHead,
) -> float:
    """Accuracy (%) of a statistics head fitted on ``train``, averaged over ``test``'s groups.

    Both are lists of (features, labels), one per experience; the mean over experiences of
    the accuracy on each is the final average accuracy of ``cl-hres`` runs and sweeps.
    """
    head = head_type(train[0][0].shape[1])
    for f, y in train:
        head.update(f, y)
    head.fit()
    return 100.0 * sum(float((head(f).argmax(1) == y).float().mean()) for f, y in test) / len(test)


def _known(feats: Features, j: int, upto: int) -> torch.Tensor:
    """Experience ``j``'s images through the backbone and the experts ``0..upto``."""
    return torch.cat([feats.pre[j], *(feats.sub[k][j] for k in range(upto + 1))], 1)


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    """``[X, 1]`` in float64."""
    return torch.cat([x, x.new_ones(len(x), 1)], 1).double()


def affine_map(inputs: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """``[A; b]`` minimising ``‖[X, 1]·[A; b] − Y‖² + λ‖A‖²`` (the bias is not penalised)."""
    x = _with_bias(inputs)
    gram = x.T @ x
    penalty = ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=gram.dtype)
    penalty[-1, -1] = 0
    return torch.linalg.solve(gram + penalty, x.T @ targets.double())


def _apply(coef: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    return (_with_bias(known) @ coef).to(known.dtype)


def imputed_subspace(
    train: Features, j: int, k: int, ridge: float, *, own: bool, exemplars: int = 0
) -> torch.Tensor:
    """``φ_k`` of experience ``j``'s images predicted from ``[φ_pre, φ_1..φ_j]``.

    The affine map is fitted on experience ``k``'s images (exemplar-free), or with ``own``
    on experience ``j``'s own images through expert ``k`` (which needs them: a diagnostic),
    cross-fitted in two halves (each half imputed by the map of the other), so that its
    error is measured on images the map did not see. With ``exemplars`` = M > 0 the own
    map is fitted on the first M images of each class only (an exemplar memory), whose
    own features are then exact.
    """
    known = _known(train, j, j)
    if not own:
        return _apply(affine_map(_known(train, k, j), train.sub[k][k], ridge), known)
    if exemplars:
        labels = train.labels[j]
        stored = torch.zeros(len(labels), dtype=torch.bool)
        for c in labels.unique():
            stored[torch.nonzero(labels == c).flatten()[:exemplars]] = True
        out = _apply(affine_map(known[stored], train.sub[k][j][stored], ridge), known)
        out[stored] = train.sub[k][j][stored]
        return out
    halves = torch.arange(len(known)) % 2 == 0
    out = torch.empty_like(train.sub[k][j])
    for fit in (halves, ~halves):
        coef = affine_map(known[fit], train.sub[k][j][fit], ridge)
        out[~fit] = _apply(coef, known[~fit])
    return out


def imputed(
    train: Features, j: int, t: int, ridge: float, *, own: bool = False, exemplars: int = 0
) -> torch.Tensor:
    """Experience ``j``'s training features in subspaces ``0..t-1``, those after ``j`` imputed."""
    parts = [_known(train, j, j)]
    parts += [
        imputed_subspace(train, j, k, ridge, own=own, exemplars=exemplars) for k in range(j + 1, t)
    ]
    return torch.cat(parts, 1)


def imputation_errors(train: Features, t: int, ridge: float) -> dict[str, float]:
    """Mean over pairs ``j < k < t`` of ``‖φ̂_k − φ_k‖ / ‖φ_k − mean‖`` on experience ``j``'s images.

    1 is the error of predicting every image by the mean of its true features.
    """
    errors: dict[str, list[float]] = {"new-experience map": [], "own map": []}
    for k in range(1, t):
        for j in range(k):
            true = train.sub[k][j].double()
            spread = (true - true.mean(0)).norm()
            for name, own in (("new-experience map", False), ("own map", True)):
                guess = imputed_subspace(train, j, k, ridge, own=own).double()
                errors[name].append(float((guess - true).norm() / spread))
    return {name: sum(v) / len(v) for name, v in errors.items() if v}


def accuracies(train: Features, test: Features, t: int) -> dict[str, float]:
    """Class-incremental accuracy on the test images of experiences ``0..t-1``, per variant."""
    seen = range(t)

    def grouped(feats: Features, upto: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each experience's (features through experts ``0..upto``, labels); None: frozen."""
        return [
            (feats.pre[j] if upto is None else _known(feats, j, upto), feats.labels[j])
            for j in seen
        ]

    first_train, first_test = grouped(train, 0), grouped(test, 0)
    all_train, test_all = grouped(train, t - 1), grouped(test, t - 1)
    out = {
        "frozen": _accuracy(grouped(train, None), grouped(test, None)),
        "first-session": _accuracy(first_train, first_test),
        "subspaces, exact": _accuracy(all_train, test_all),
        # EASE's head family: cosine to class means, on first-session features and with the
        # exact means of every subspace (what its semantic prototype complement estimates).
        "first-session, cosine head": _accuracy(first_train, first_test, head_type=NCMHead),
        "subspaces, exact class means, cosine head": _accuracy(
            all_train, test_all, head_type=NCMHead
        ),
    }
    for ridge in IMPUTE_RIDGES:
        out[f"subspaces, imputed λ={ridge:g}"] = _accuracy(
            [(imputed(train, j, t, ridge), train.labels[j]) for j in seen], test_all
        )
    for ridge in IMPUTE_RIDGES:
        out[f"subspaces, imputed by the old images' own map λ={ridge:g} (needs them)"] = _accuracy(
            [(imputed(train, j, t, ridge, own=True), train.labels[j]) for j in seen], test_all
        )
    for m in EXEMPLARS:
        out[f"subspaces, own map fitted on {m} stored images per class λ={EXEMPLAR_RIDGE:g}"] = (
            _accuracy(
                [
                    (imputed(train, j, t, EXEMPLAR_RIDGE, own=True, exemplars=m), train.labels[j])
                    for j in seen
                ],
                test_all,
            )
        )
    out["two-stage"] = two_stage(train, test, t)[0]
    return out


def two_stage(train: Features, test: Features, t: int) -> tuple[float, float]:
    """Experience by the first-session head, then the class by that experience's subspace.

    Returns:
        The accuracy (%, averaged over experiences) and how often (%, likewise) the first
        stage picks the image's own experience.
    """
    first = RidgeHead(2 * train.pre[0].shape[1])
    owner: dict[int, int] = {}
    own_heads = []
    for j in range(t):
        first.update(_known(train, j, 0), train.labels[j])
        own = RidgeHead(2 * train.pre[0].shape[1])
        own.update(torch.cat([train.pre[j], train.sub[j][j]], 1), train.labels[j])
        own.fit()
        own_heads.append(own)
        owner.update({int(c): j for c in train.labels[j].unique()})
    first.fit()
    accuracy = routed = 0.0
    for j in range(t):
        picked = first(_known(test, j, 0)).argmax(1)
        experience = torch.tensor([owner[int(c)] for c in picked])
        correct = 0
        for k in experience.unique().tolist():
            rows = experience == k
            f = torch.cat([test.pre[j][rows], test.sub[k][j][rows]], 1)
            correct += int((own_heads[k](f).argmax(1) == test.labels[j][rows]).sum())
        accuracy += correct / len(test.labels[j])
        routed += float((experience == j).float().mean())
    return 100.0 * accuracy / t, 100.0 * routed / t


@torch.no_grad()
def _features(
    pristine: torch.nn.Module,
    models: Sequence[torch.nn.Module],
    experiences,
    batch_size: int,
    device: str,
) -> Features:
    """Every experience's images through the untouched backbone and through each model."""
    pre, labels = [], []
    sub: list[list[torch.Tensor]] = [[] for _ in models]
    for exp in experiences:
        loader = DataLoader(exp.dataset.eval(), batch_size=batch_size, shuffle=False)
        chunks: list[list[torch.Tensor]] = [[] for _ in range(len(models) + 2)]
        for batch in loader:
            x = batch[0].to(device)
            tokens = pristine.forward_features(x)
            chunks[0].append(pristine.forward_head(tokens, pre_logits=True).float().cpu())
            for k, model in enumerate(models):
                chunks[k + 1].append(model.backbone_features(x).float().cpu())
            chunks[-1].append(batch[1])
        pre.append(torch.cat(chunks[0]))
        for k in range(len(models)):
            sub[k].append(torch.cat(chunks[k + 1]))
        labels.append(torch.cat(chunks[-1]))
    return Features(pre, sub, labels)


def seed_config(options: dict, seed: int, validation: float) -> RunConfig:
    """The run's config for ``seed``, with the strategy's method (which trains each expert)."""
    from cl_hres.reporting.forward_transfer import method_family

    cfg = RunConfig.from_dict(dict(options, seed=seed, validation=validation))
    cfg = RunConfig.from_dict(dict(cfg.to_dict(), strategy=method_family(cfg.strategy)))
    cfg.validate()
    return cfg


def run_seed(prep: Prepared) -> dict[str, dict[str, float]]:
    """Trains one expert per experience alone and scores every variant after each experience."""
    from cl_hres.data.loaders import apply_threads, resolve_loader_settings
    from cl_hres.data.streams import build_stream
    from cl_hres.run.context import make_strategy
    from cl_hres.run.prepare import seed_everything

    cfg = prep.config
    seed = cfg.seed
    # Loaders and threads as a run of the stream has them (cl_hres.data.loaders).
    loader = resolve_loader_settings(cfg.num_workers, device=cfg.device, kind=prep.data.kind)
    apply_threads(loader)
    seed_everything(seed)
    stream = build_stream(  # the run's layout: class order, B/Inc sizes, by-domain
        prep.data,
        experiences=cfg.experiences,
        scenario=cfg.scenario,
        seed=seed,
        transforms=prep.transforms,
        class_order=prep.class_order,
        initial_classes=cfg.initial_classes,
        increment=cfg.increment,
    )
    pristine = copy.deepcopy(prep.backbone)
    models = []
    for exp in stream.train_stream:
        alone = dataclasses.replace(prep, backbone=copy.deepcopy(pristine))
        seed_everything(seed)  # as the stream's run and the FWT references are seeded
        strategy, _ = make_strategy(alone, None)
        seed_everything(seed)
        strategy.train(exp, **loader.strategy_kwargs())
        models.append(strategy.model.eval())
    pristine = pristine.to(cfg.device).eval()
    train = _features(pristine, models, stream.train_stream, cfg.eval_batch_size, cfg.device)
    test = _features(pristine, models, stream.test_stream, cfg.eval_batch_size, cfg.device)
    t = len(models)
    return {
        "accuracy": {str(i): accuracies(train, test, i) for i in range(1, t + 1)},
        # How often (%, averaged over experiences) two-stage's first stage is right.
        "experience_chosen_right": two_stage(train, test, t)[1],
        "imputation_error": {
            f"{ridge:g}": imputation_errors(train, t, ridge) for ridge in IMPUTE_RIDGES
        },
    }


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", default="{}", help="JSON: options (default: the shipped ones)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--validation", type=float, default=0.2, help="train fraction held out")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    _warnings.show_as_one_line()
    if not 0 < args.validation < 1:
        p.error("--validation must be in (0, 1): this measurement never looks at the test split")
    given = p.json_option("--set", args.set)
    if not isinstance(given, dict):
        p.error("--set must be a JSON object of option -> value")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds must not repeat a seed, got {args.seeds!r}")
    options = {"strategy": "hres-nsp", "fwt_reference": False, **given}
    try:  # every config checked, and the first seed's data and weights loaded, before writing
        configs = [seed_config(options, s, args.validation) for s in seeds]
        first = prepare(configs[0])
    except ClHresError as exc:
        p.error(str(exc))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out: cannot create {args.out} ({exc.strerror})")
    try:
        per_seed = {
            str(cfg.seed): run_seed(first if i == 0 else prepare(cfg))
            for i, cfg in enumerate(configs)
        }
    except ClHresError as exc:
        p.error(str(exc))
    final = {
        s: max(r["accuracy"].items(), key=lambda kv: int(kv[0]))[1] for s, r in per_seed.items()
    }
    variants = list(final[str(seeds[0])])
    summary = {v: mean_std([final[str(s)][v] / 100 for s in seeds]) for v in variants}
    gaps = {
        v: mean_std([(final[str(s)][v] - final[str(s)]["first-session"]) / 100 for s in seeds])
        for v in variants
    }
    errors = {
        ridge: {
            name: mean_std([per_seed[str(s)]["imputation_error"][ridge][name] for s in seeds])
            for name in by_name
        }
        for ridge, by_name in per_seed[str(seeds[0])]["imputation_error"].items()
    }
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    atomic_write_text(
        args.out / "subspace_bound.json",
        json.dumps(
            {"command": command, "options": options, "seeds": seeds, "per_seed": per_seed},
            indent=1,
        ),
    )
    lines = [
        f"`{command}`",
        "",
        f"Options {json.dumps(options)} ({options['strategy']}'s method trains each expert "
        f"alone), {args.validation:.0%} of the training split as validation, seeds "
        f"{', '.join(map(str, seeds))}. Class-incremental accuracy after the last "
        "experience (mean ± sample std over seeds) and its gap to first-session "
        "adaptation, paired by seed:",
        "",
        "| variant | final acc (%) | vs first-session (pp) |",
        "|---|---|---|",
    ]
    for v in variants:
        m, g = summary[v], gaps[v]
        lines.append(
            f"| {v} | {100 * m['mean']:.2f} ± {100 * m['std']:.2f} "
            f"| {100 * g['mean']:+.2f} ± {100 * g['std']:.2f} |"
        )
    routed = mean_std([per_seed[str(s)]["experience_chosen_right"] / 100 for s in seeds])
    lines += [
        "",
        "Two-stage's first stage picks the image's own experience for "
        f"{100 * routed['mean']:.2f} ± {100 * routed['std']:.2f}% of the images.",
        "",
        "Imputation error on old images (‖φ̂_k − φ_k‖ / ‖φ_k − mean‖, mean over pairs j < k; "
        "1 = predicting every image by the mean; the own map cross-fitted in two halves):",
        "",
        "| λ | " + " | ".join(next(iter(errors.values()))) + " |",
        "|---" * (1 + len(next(iter(errors.values())))) + "|",
    ]
    for ridge, by_name in errors.items():
        lines.append(
            f"| {ridge} | "
            + " | ".join(f"{e['mean']:.3f} ± {e['std']:.3f}" for e in by_name.values())
            + " |"
        )
    atomic_write_text(args.out / "subspace_bound.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
