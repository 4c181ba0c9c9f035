"""Which methods and strategies exist: the one place where a new one is registered.

A *method* is what is added to the frozen ViT (H-Res experts, LoRA branches, prompts, or
nothing): its config class and the function that attaches it, as peft maps its tuner
types to configs. A *strategy* is how a method meets the stream (an expert per
experience or one for all, null-space projection, first session only, all experiences at
once) and the name users pass to ``--strategy``. The model, the run config, the CLI, the
forward-transfer reference and the Avalanche strategy classes all read these tables, so
adding a method is one :func:`register_strategy` call (with a :class:`MethodSpec` when the
method is new), in a module of its own or in a user's script.

The module imports neither torch nor Avalanche (``--help`` and config checks stay fast):
attach functions and strategy classes may be given as ``"module:attribute"`` strings and
are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "METHODS",
    "STRATEGIES",
    "MethodSpec",
    "StrategySpec",
    "register_method",
    "register_strategy",
    "resolve",
    "strategy_names",
]


@dataclass(frozen=True)
class MethodSpec:
    """What a method adds to a frozen timm ViT.

    Attributes:
        name: Method name (``ContinualViT(method=...)``).
        config_type: Its dataclass config (built with defaults when none is given), its
            ``"module:Class"`` path, or None for a method without options.
        attach: ``(vit, config) -> list[ExpertBank]``, or its ``"module:function"`` path:
            adds the method's modules to the ViT in place and returns the expert banks
            (empty for methods without banks); None adds nothing.
        trains_backbone: Every backbone weight is trainable (fine-tuning).
        switchable: Its modules can be switched off to read the pretrained features
            (needed by ``concat_pretrained``).
    """

    name: str
    config_type: type | str | None = None
    attach: Callable[..., list] | str | None = None
    trains_backbone: bool = False
    switchable: bool = False

    @property
    def config_class(self) -> type | None:
        """The config dataclass (imported on first use when given as a path)."""
        return resolve(self.config_type)


@dataclass(frozen=True)
class StrategySpec:
    """How a method meets the stream, under the name users pass to ``--strategy``.

    Attributes:
        name: Strategy name.
        summary: One line for ``--help``.
        method: Name of a registered method, or a new :class:`MethodSpec` (registered
            along with the strategy).
        strategy_class: The Avalanche strategy class or its ``"module:Class"`` path; None
            derives a sequential cl-hres strategy from these fields.
        expert_per_experience: A new expert per experience (older ones frozen) instead of
            one expert trained on every experience.
        uses_nsp: Null-space projection protects old experiences' inputs.
        trains_whole_stream: Trains once on every experience together (Joint): no
            per-experience curves, no forward-transfer reference.
        concat_pretrained: The head reads ``[pretrained(x), adapted(x)]`` by default.
        adapt_experiences: The method trains during the first N experiences only.
        reference: Strategy whose one-experience run is the forward-transfer reference
            (an NSP variant learns its first experience as its unprotected twin does);
            None: the strategy itself.
        head: The evaluation head unless the run names one; None: ``ridge``.
        ridge_projection: The ridge head's random-projection width unless the run names
            one; None: 0 (no projection).
    """

    name: str
    summary: str
    method: str | MethodSpec = "hres"
    strategy_class: type | str | None = None
    expert_per_experience: bool = True
    uses_nsp: bool = False
    trains_whole_stream: bool = False
    concat_pretrained: bool = False
    adapt_experiences: int | None = None
    reference: str | None = None
    head: str | None = None
    ridge_projection: int | None = None

    @property
    def method_name(self) -> str:
        """The name of the strategy's method."""
        return self.method if isinstance(self.method, str) else self.method.name

    @property
    def method_spec(self) -> MethodSpec:
        """The registered :class:`MethodSpec` of the strategy's method."""
        return METHODS[self.method_name]

    @property
    def reference_strategy(self) -> str:
        """The registered strategy whose one-experience run is this one's FWT reference."""
        name = self.reference or self.name
        # Checked on use: a reference may be registered after the strategy naming it.
        if name not in STRATEGIES or STRATEGIES[name].method_name != self.method_name:
            raise ValueError(
                f"strategy {self.name!r}: reference {name!r} is not a {self.method_name} strategy"
            )
        return name


METHODS: dict[str, MethodSpec] = {}
STRATEGIES: dict[str, StrategySpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Adds a method; names are unique."""
    if spec.name in METHODS and METHODS[spec.name] != spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def register_strategy(spec: StrategySpec) -> StrategySpec:
    """Adds a strategy (and its method when ``spec.method`` is a :class:`MethodSpec`)."""
    if spec.name in STRATEGIES:
        raise ValueError(f"strategy {spec.name!r} is already registered")
    if isinstance(spec.method, MethodSpec):
        register_method(spec.method)
    elif spec.method not in METHODS:
        raise ValueError(f"strategy {spec.name!r} uses unknown method {spec.method!r}")
    if spec.trains_whole_stream and spec.strategy_class is None:
        raise ValueError(
            f"strategy {spec.name!r} trains the whole stream: give it a JointTraining class"
        )
    if spec.concat_pretrained and not spec.method_spec.switchable:
        raise ValueError(f"strategy {spec.name!r}: method {spec.method_name} is not switchable")
    STRATEGIES[spec.name] = spec
    return spec


def strategy_names() -> tuple[str, ...]:
    """Registered strategy names, sorted."""
    return tuple(sorted(STRATEGIES))


def resolve(target: Any) -> Any:
    """Imports a ``"module:attribute"`` path; anything else is returned as it is."""
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


# ------------------------------------------------------------------ built-in methods
# Paths, not objects: this module imports neither torch nor the method modules.
_CONFIGS = "cl_hres.nn.config"
_ADAPTERS = "cl_hres.nn.adapters"
_PROMPTS = "cl_hres.nn.prompts"
for _name, _config, _attach in (
    ("hres", "HResConfig", f"{_ADAPTERS}:add_hres_experts"),
    ("lora", "LoRAConfig", f"{_ADAPTERS}:add_lora_experts"),
    ("vpt", "VPTConfig", f"{_PROMPTS}:attach_vpt_prompts"),
    ("l2p", "L2PConfig", "cl_hres.nn.prompt_pool:attach_prompt_pool"),
    ("dualprompt", "DualPromptConfig", "cl_hres.nn.dual_prompt:attach_dual_prompt"),
    ("coda-prompt", "CodaPromptConfig", "cl_hres.nn.coda_prompt:attach_coda_prompt"),
):
    register_method(MethodSpec(_name, f"{_CONFIGS}:{_config}", _attach, switchable=True))
register_method(MethodSpec("linear"))
register_method(MethodSpec("finetune", trains_backbone=True))

# --------------------------------------------------------------- built-in strategies
_S = "cl_hres.avalanche.strategies"
for _spec in (
    StrategySpec(
        "hres-nsp",
        "H-Res expert per experience, kept in the null space of old inputs (proposed)",
        strategy_class=f"{_S}:HResNSP",
        uses_nsp=True,
        reference="hres",
        # [pretrained, adapted] head features: 95.2 vs 93.5% class-IL on validation
        # (results/sweeps/concat).
        concat_pretrained=True,
    ),
    StrategySpec(
        "hres",
        "H-Res expert per experience, no null-space projection",
        strategy_class=f"{_S}:HRes",
        concat_pretrained=True,  # as hres-nsp (23.9 vs 20.9%, results/sweeps/concat-others)
    ),
    StrategySpec(
        "lora",
        "one LoRA adapter trained sequentially",
        method="lora",
        strategy_class=f"{_S}:LoRA",
        expert_per_experience=False,
        concat_pretrained=True,  # 27.2 vs 25.4% (results/sweeps/concat-others, lora-lr)
    ),
    StrategySpec(
        "lora-nsp",
        "LoRA branch per experience with A in the null space (InfLoRA-like)",
        method="lora",
        strategy_class=f"{_S}:LoRANSP",
        uses_nsp=True,
        reference="lora",
        concat_pretrained=True,  # 94.6 vs 92.6% (results/sweeps/concat-first-session)
    ),
    StrategySpec(
        "vpt",
        "visual prompt tuning, prompts trained sequentially",
        method="vpt",
        strategy_class=f"{_S}:VPT",
        # Off: the concatenation costs VPT on validation (90.3 vs 92.6% at lr 1e-4,
        # results/sweeps/concat-vpt and vpt-lr).
    ),
    StrategySpec(
        "l2p",
        "Learning to Prompt: a prompt pool, prompts chosen by key matching (Wang et al. 2022)",
        method="l2p",
        strategy_class=f"{_S}:L2P",
        expert_per_experience=False,
    ),
    StrategySpec(
        "dualprompt",
        "DualPrompt: a shared G-prompt and an E-prompt per experience, by prefix-tuning "
        "(Wang et al. 2022)",
        method="dualprompt",
        strategy_class=f"{_S}:DualPrompt",
        expert_per_experience=False,
    ),
    StrategySpec(
        "coda-prompt",
        "CODA-Prompt: prompts from attention-weighted components, new ones per experience "
        "(Smith et al. 2023)",
        method="coda-prompt",
        strategy_class=f"{_S}:CodaPrompt",
        expert_per_experience=False,
    ),
    StrategySpec(
        "linear",
        "frozen backbone, only the head (linear probe)",
        method="linear",
        strategy_class=f"{_S}:LinearProbe",
    ),
    StrategySpec(
        "finetune",
        "every backbone weight trained sequentially",
        method="finetune",
        strategy_class=f"{_S}:FineTune",
    ),
    StrategySpec(
        "joint",
        "one expert trained on all experiences at once (upper bound)",
        strategy_class=f"{_S}:Joint",
        expert_per_experience=False,
        trains_whole_stream=True,
        # Off: 94.8 with vs 95.4% without (results/sweeps/concat-others, joint-lr), so the
        # upper bound is the stronger of the two.
    ),
    StrategySpec(
        "aper",
        "first-session adaptation (APER/RanPAC): expert trained on experience 0, then frozen",
        strategy_class=f"{_S}:FirstSessionAdaptation",
        expert_per_experience=False,
        reference="hres",  # one experience alone is learned exactly as hres learns it
        concat_pretrained=True,  # APER's own; 95.0 vs 91.8% (results/sweeps/concat-first-session)
        adapt_experiences=1,
    ),
    StrategySpec(
        "hres-views",
        "an H-Res expert per experience trained alone, prototypes over every expert's view "
        "(EASE-style, exemplar-free)",
        strategy_class=f"{_S}:ExpertViews",
        reference="hres",
        head="ncm",
    ),
    StrategySpec(
        "hres-routed",
        "an H-Res expert and a ridge head per experience, trained alone; a first-session "
        "router picks the experience (exemplar-free)",
        strategy_class=f"{_S}:RoutedExperts",
        reference="hres",
        concat_pretrained=True,
        ridge_projection=2000,  # as ranpac: the router is RanPAC's head
    ),
    StrategySpec(
        "simplecil",
        "SimpleCIL: class means of the frozen backbone, cosine (no training at all)",
        method="linear",
        strategy_class=f"{_S}:SimpleCIL",
        head="ncm",
    ),
    StrategySpec(
        "ranpac",
        "RanPAC: first-session expert, random ReLU projection, Gram ridge head",
        strategy_class=f"{_S}:RanPAC",
        expert_per_experience=False,
        reference="hres",
        adapt_experiences=1,
        # RanPAC's M = 10,000 for a 768-wide ViT-B; 2,000 here keeps the Gram matrix of a
        # small backbone at 32 MB (the projection's width is an option).
        ridge_projection=2000,
    ),
):
    register_strategy(_spec)
