"""How the null space of old inputs is chosen: the configuration of the projection."""

from __future__ import annotations

from dataclasses import dataclass, field

from cl_hres.checks import check_finite_positive, check_range, is_number
from cl_hres.errors import ConfigError

__all__ = ["NSP_RULES", "NullSpaceConfig"]

NSP_RULES = ("energy", "ratio", "relative")


@dataclass
class NullSpaceConfig:
    """How the null space of the old tasks' input covariance is chosen.

    Rules (eigenvalues λ of the normalised covariance, λ_max the largest):
      * ``energy`` (GPM / InfLoRA): protect the leading eigenvectors holding ``threshold``
        of the total energy; the rest is the null space. ``threshold`` in (0, 1).
      * ``ratio`` (Adam-NSCL): null space is λ ≤ ``threshold`` · λ_min, with λ_min floored
        at 1e-12·λ_max so that exactly singular covariances behave. ``threshold`` ≥ 1.
      * ``relative``: null space is λ ≤ ``threshold`` · λ_max. ``threshold`` in (0, 1).
    ``eta`` < 1 relaxes the projector to ``eta·P + (1 − eta)·I`` (VPT-NSP²); it trades
    exactness for plasticity. ``min_free_energy``: a bank takes an expert for a new
    experience only where at least this share of the experience's input energy (measured
    on its data before training, token groups weighed as for the projector) lies in the
    directions the projector leaves free; below it the expert could learn (almost)
    nothing and would only cost inference compute. 0 adds one wherever a free direction
    exists. ``min_selectivity`` (0: off): a bank also takes no expert where that share is
    less than ``min_selectivity`` times the share of the *old* inputs' energy the same
    directions hold. Along a direction where new inputs have μ times the old ones' energy,
    an expert moves old features by about ``1/√μ`` of what it moves new ones, so with a
    loose threshold this admits only the banks whose free directions tell the new
    experience from the old ones (per block and per experience). With ``eta`` < 1 the old
    share is at least ``1 − eta``, so ``min_selectivity`` > ``1/(1 − eta)`` makes every
    constrained bank dormant.
    """

    rule: str = field(default="relative", metadata={"help": "energy | ratio | relative"})
    threshold: float = field(default=1e-6, metadata={"help": "Parameter of the rule."})
    eta: float = field(default=1.0, metadata={"help": "Relaxation in (0, 1]; 1 is exact."})
    min_free_energy: float = field(
        default=1e-6,
        metadata={
            "help": "Share of a new experience's input energy a bank's free directions must "
            "hold for it to take an expert (0: always)."
        },
    )
    min_selectivity: float = field(
        default=0.0,
        metadata={
            "help": "Ratio of the new to the old inputs' energy shares in a bank's free "
            "directions below which it takes no expert (0: off)."
        },
    )
    separate_prefix: bool = field(
        default=True,
        metadata={"help": "Normalise prefix (cls/register) and patch tokens separately."},
    )
    precision: str = field(
        default="float64",
        metadata={"help": "Precision of each batch's XᵀX: float64 (exact) or float32."},
    )

    def __post_init__(self) -> None:
        if self.rule not in NSP_RULES:
            raise ConfigError(f"nsp rule must be one of {', '.join(NSP_RULES)}, got {self.rule!r}")
        if self.rule == "ratio":
            check_finite_positive("nsp threshold", self.threshold)
            if self.threshold < 1:
                raise ConfigError("nsp threshold for rule ratio must be >= 1")
        else:
            check_range(f"nsp threshold for rule {self.rule}", self.threshold, 0, 1, closed="()")
        check_range("nsp eta", self.eta, 0, 1, closed="(]")
        check_range("nsp min_free_energy", self.min_free_energy, 0, 1, closed="[)")
        q = self.min_selectivity
        if not is_number(q) or not 0 <= q < float("inf"):
            raise ConfigError(f"nsp min_selectivity must be a number >= 0, got {q!r}")
        if self.precision not in ("float64", "float32"):
            raise ConfigError(f"nsp precision must be float64 or float32, got {self.precision!r}")
