"""Null-space projection (NSP): covariance of old inputs, projectors, enforcement.

The maths is in ``docs/method.md``. For each expert bank we keep the uncentred
second moment of its input over all old experiences, split into token groups (prefix
cls/register tokens and patch tokens). Each group is normalised by its trace before the
groups are summed, so the small-norm cls token is protected as well as the patch tokens.
The projector onto the span of "small" eigenvectors keeps every new expert's ``down``
rows in the null space; then ``down · x_old ≈ 0`` and the new expert adds nothing to old
inputs, block after block.

The state lives in the model: :class:`NullSpaceGuard` gives every protected bank a
:class:`NullSpaceState` submodule (``bank.null_space``) whose buffers hold the covariance
sums, the token counts and the projector. ``model.to()`` moves them, ``model.state_dict()``
saves them, DDP sees them, and they are created on the bank's device even while the bank
holds no expert. Accumulation is one matmul per batch and group, projection one matmul
per weight; no value is read back to the host during training.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from cl_hres import distributed
from cl_hres._warnings import ClHresWarning
from cl_hres.nn.experts import ExpertBank
from cl_hres.nsp.config import NullSpaceConfig
from cl_hres.nsp.projector import null_space_projector
from cl_hres.nsp.state import CovarianceAccumulator, NullSpaceState, attach_null_space

__all__ = ["NullSpaceGuard", "PlasticityWarning"]


class PlasticityWarning(ClHresWarning):
    """An expert bank's null space became empty: it takes no new experts from then on."""


class NullSpaceGuard:
    """Keeps the trainable ``down`` weights of expert banks in the old inputs' null space.

    Independent of any training framework: call :meth:`collect` (or run forward passes
    inside :meth:`collecting`) after an experience, :meth:`project_weights` once a new
    expert exists, and :meth:`step` instead of ``optimizer.step()`` (or the hooks it is
    made of: :meth:`begin_update`, :meth:`project_grads`, :meth:`project_weights`).

    Every optimizer step is projected as an *update*: ``W ← W_old + (W − W_old)·P_η``
    (Adam-NSCL, VPT-NSP²), so with η < 1 the relaxed share outside the null space
    accumulates over steps. At η = 1 this equals ``W ← W·P`` (``W_old`` already lies in
    the null space), which is what is computed then, exact under any optimizer; the
    gradient is projected too at η = 1, which keeps Adam's moments in the null space,
    but not at η < 1, where that would shrink the relaxed share twice.

    The statistics live in the banks (:class:`NullSpaceState`); a second guard over the
    same banks shares them.

    Args:
        banks: The expert banks to protect.
        config: Threshold rule and relaxation.
    """

    def __init__(self, banks: Iterable[ExpertBank], config: NullSpaceConfig) -> None:
        self.banks = list(banks)
        self.config = config
        self.states = [attach_null_space(b) for b in self.banks]
        self._before: dict[int, torch.Tensor] | None = None
        # Per bank, after each collecting pass: the shares of that pass's input energy and
        # of the older inputs' energy that the projector lets through (None where no
        # projector constrained the experience).
        self.free_energy: list[tuple[float, float] | None] = [None] * len(self.states)
        # Per bank, after the admission pass of the current experience: the share of its
        # input energy in the free directions before training, and the same share of the
        # older inputs' energy (None: not measured).
        self.admission_energy: list[float | None] = []
        self.admission_old_energy: list[float | None] = []
        self._forget_admission()

    @property
    def accumulators(self) -> list[CovarianceAccumulator]:
        """The covariance accumulator of every bank."""
        return [s.covariance for s in self.states]

    @property
    def projectors(self) -> list[torch.Tensor] | None:
        """Every bank's float32 projector, or None before any statistics were collected."""
        if not any(s.ready for s in self.states):
            return None
        return [s.projector for s in self.states]

    @property
    def null_dims(self) -> list[int]:
        """Null-space dimension per bank ([] before any statistics were collected)."""
        if not all(s.ready for s in self.states):
            return []
        return [s.dimension for s in self.states]

    @property
    def closed_banks(self) -> list[int]:
        """Indices of the banks whose null space is empty (no new experts)."""
        return [i for i, s in enumerate(self.states) if s.closed]

    @contextmanager
    def recording(self):
        """Within the block, every forward pass adds the banks' inputs to the statistics."""
        handles = [
            bank.register_forward_pre_hook(_make_hook(state.covariance, self.config.precision))
            for bank, state in zip(self.banks, self.states)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def collect(
        self, forward: Callable[[torch.Tensor], object], batches: Iterable[torch.Tensor]
    ) -> None:
        """Runs ``forward`` over ``batches`` while recording, then refreshes the projectors."""
        with self.collecting():
            for x in batches:
                forward(x)

    @contextmanager
    def collecting(self):
        """Like :meth:`recording`, then combines ranks and refreshes the projectors.

        Lets a forward pass that runs anyway (e.g. the one feeding a statistics head)
        also feed the covariance, instead of a second pass over the data. Under
        torch.distributed each rank records its shard and the sums are all-reduced, so
        every rank gets the same projectors. Every rank holds the same totals before the
        pass, so ranks other than 0 start it from zero: one all-reduce then adds each
        rank's increment once to rank 0's old totals, without a copy of the sums (in one
        process nothing is copied or reduced at all).
        """
        multi = distributed.is_distributed()
        # Every rank holds the old totals here (ranks other than 0 zero theirs just
        # below): two numbers per token group give the pass's own share afterwards.
        before = [_group_traces(s, self.config) for s in self.states]
        if multi and distributed.rank() != 0:
            for state in self.states:
                state.covariance.zero_()
        with self.recording():
            yield
        if multi:
            for state in self.states:
                distributed.all_reduce_(state.covariance.sums)
                distributed.all_reduce_(state.covariance.counts)
        # Measured with the projectors the pass's experience was trained under.
        self.free_energy = [_free_share(s, self.config, old) for s, old in zip(self.states, before)]
        self.refresh()

    @contextmanager
    def admitting(self):
        """Passes over a new experience's data, before its experts exist, pick its banks.

        Within the block every protected bank with a free direction records its inputs
        into a temporary accumulator (the old statistics are not touched); on exit the
        share of their energy in the directions the current projector leaves free is
        stored per bank in :attr:`admission_energy`, and a bank whose share is below
        ``config.min_free_energy``, or below ``config.min_selectivity`` times the share of
        the old inputs' energy in the same directions, is *dormant* for this experience:
        it takes no expert (``ExpertBank.add_expert``), so it costs nothing it could not
        use (or would use as much on old inputs as on new ones). The inputs are
        those the new expert would see, since a new expert starts at zero. Under
        torch.distributed the temporary sums are all-reduced, so every rank decides alike.
        Passes that no bank needs (first experience, every bank closed) can be skipped:
        :attr:`needs_admission_pass`.
        """
        pending = {i: self.states[i].covariance.empty_like() for i in self._constrained_open()}
        handles = [
            self.banks[i].register_forward_pre_hook(_make_hook(a, self.config.precision))
            for i, a in pending.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._forget_admission()
        for i, acc in pending.items():
            if distributed.is_distributed():
                distributed.all_reduce_(acc.sums)
            state = self.states[i]
            share = _share(_group_traces(state, self.config, acc.sums))
            old = _share(_group_traces(state, self.config))
            self.admission_energy[i], self.admission_old_energy[i] = share, old
            old = old or 0.0
            state.dormant = share is not None and (
                share < self.config.min_free_energy or share < self.config.min_selectivity * old
            )

    @property
    def needs_admission_pass(self) -> bool:
        """Whether :meth:`admitting` could make a bank dormant.

        Only once a projector constrains a bank; by the energy test never with a
        relaxation that lets through at least ``min_free_energy`` of every input
        (``P_η ⪰ (1 − η)·I``), by the selectivity test whenever it is on.
        """
        cfg = self.config
        by_energy = 0 < cfg.min_free_energy and 1 - cfg.eta < cfg.min_free_energy
        return (by_energy or cfg.min_selectivity > 0) and bool(self._constrained_open())

    def _constrained_open(self) -> list[int]:
        """Banks a projector constrains that still have a free direction."""
        return [i for i, s in enumerate(self.states) if s.ready and not s.closed]

    @property
    def dormant_banks(self) -> list[int]:
        """Indices of the banks that take no expert for the current experience."""
        return [i for i, s in enumerate(self.states) if s.dormant]

    def wake(self) -> None:
        """Ends the experience's dormancy: every open bank may take the next expert."""
        for state in self.states:
            state.dormant = False
        self._forget_admission()

    def _forget_admission(self) -> None:
        """No bank measured by an admission pass (yet, or any more)."""
        self.admission_energy = [None] * len(self.states)
        self.admission_old_energy = [None] * len(self.states)

    def refresh(self) -> None:
        """Recomputes every projector from the accumulated statistics.

        Emits a :class:`PlasticityWarning` (one line, rank 0 only) when banks lose their
        last free direction.
        """
        newly_closed = []
        exact = self.config.eta >= 1
        with torch.no_grad():
            for i, state in enumerate(self.states):
                was_closed = state.closed
                proj, k = null_space_projector(
                    state.covariance.matrix(separate_prefix=self.config.separate_prefix),
                    self.config,
                )
                state.set_projector(proj.float(), k, closed=exact and k == 0)
                if state.closed and not was_closed:
                    newly_closed.append(i)
        if newly_closed and distributed.rank() == 0:
            cfg = self.config
            warnings.warn(
                f"null-space projection (rule {cfg.rule}, threshold {cfg.threshold:g}) left no "
                f"free direction in {len(newly_closed)} of {len(self.states)} expert banks "
                f"(indices {', '.join(map(str, newly_closed))}): they take no new experts "
                "and stop adapting; a larger threshold or eta < 1 buys plasticity with drift "
                "of old features (see free_energy in results.json)",
                PlasticityWarning,
                stacklevel=2,
            )

    def begin_update(self) -> None:
        """Remembers the trainable ``down`` weights before an optimizer step (η < 1 only)."""
        if self.config.eta >= 1:
            return
        self._before = {
            id(w): w.detach().clone()
            for bank, state in zip(self.banks, self.states)
            if state.ready
            for w in bank.trainable_down_weights()
        }

    @torch.no_grad()
    def project_weights(self) -> None:
        """Projects every trainable ``down`` weight's update since :meth:`begin_update`.

        ``W ← W_old + (W − W_old)·P`` with ``W_old`` from :meth:`begin_update`; without one
        (a new expert, or η = 1) the whole weight counts as the update: ``W ← W·P``.
        """
        before, self._before = self._before, None
        for bank, state in zip(self.banks, self.states):
            if not state.ready:
                continue
            proj = state.projector
            for w in bank.trainable_down_weights():
                old = before.get(id(w)) if before else None
                # float32 arithmetic also for bfloat16 experts; a no-op cast for float32.
                wf = w.float()
                if old is None:
                    w.copy_(wf @ proj)
                else:
                    old = old.float()
                    w.copy_(old + (wf - old) @ proj)

    @torch.no_grad()
    def project_grads(self) -> None:
        """``g ← g·P`` at η = 1 (exact for SGD); nothing at η < 1 (see the class doc)."""
        if self.config.eta < 1:
            return
        for bank, state in zip(self.banks, self.states):
            if not state.ready:
                continue
            for w in bank.trainable_down_weights():
                if w.grad is not None:
                    w.grad.copy_(w.grad.float() @ state.projector)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """One constrained update for a hand-written loop.

        (The Avalanche plugin calls the same three projections from its own hooks.)
        """
        self.begin_update()
        self.project_grads()
        optimizer.step()
        self.project_weights()


def _group_traces(
    state: NullSpaceState, config: NullSpaceConfig, sums: torch.Tensor | None = None
) -> torch.Tensor:
    """Per token group as the projector weighs them, ``tr(S_g)`` and ``tr(P·S_g)``.

    Args:
        state: The bank's state (projector, sums).
        config: Says how token groups are weighed.
        sums: Per-group sums to measure; default the state's accumulated ones.
    """
    groups = state.covariance.groups(sums, separate_prefix=config.separate_prefix)
    proj = state.projector.to(groups.dtype)
    # tr(P·S) = Σ_ij P_ij S_ij for symmetric P, S; no copy of the statistics is made.
    return torch.stack(
        [torch.stack([g.diagonal().sum(), torch.tensordot(proj, g)]) for g in groups]
    )


@torch.no_grad()
def _free_share(
    state: NullSpaceState, config: NullSpaceConfig, before: torch.Tensor
) -> tuple[float, float] | None:
    """Shares of the new and of the old inputs' energy that the projector lets through.

    ``tr(P·Σ)/tr(Σ)`` for ``Σ_new``, the pass's own second moment (sums after it minus
    ``before``, from :func:`_group_traces`), and for ``Σ_old``, the sums before it; token
    groups normalised by their trace and weighted equally, as for the projector. At η = 1
    the first is the share of the new experience's input energy in the old inputs' null
    space: what its expert could learn from without moving old features. The ratio of the
    two says how selective those directions are: near 1, whatever the expert does to new
    inputs through them it does about as strongly to old ones. The projector is stored in
    float32, so where P removes (nearly) everything the shares sit at its noise floor,
    ~1e-8, and can come out slightly negative: they are clipped to [0, 1].
    """
    if not state.ready:
        return None
    new, old = _share(_group_traces(state, config) - before), _share(before)
    return None if new is None or old is None else (new, old)


def _share(traces: torch.Tensor) -> float | None:
    """Mean over token groups with energy of ``tr(P·S_g)/tr(S_g)``, clipped to [0, 1].

    Args:
        traces: ``(groups, 2)`` rows of ``tr(S_g)``, ``tr(P·S_g)`` (:func:`_group_traces`).
    """
    groups = traces[traces[:, 0] > 0]
    if len(groups) == 0:
        return None
    return float((groups[:, 1] / groups[:, 0]).mean().clamp(0, 1))


def _make_hook(acc: CovarianceAccumulator, precision: str):
    def hook(module: nn.Module, args: tuple) -> None:
        # A pass with the experts switched off (the pretrained half of concatenated
        # features) is not what the experts will read: it must not enter the statistics.
        if getattr(module, "enabled", True):
            acc.update(args[0].detach(), precision=precision)

    return hook
