"""The registered Avalanche strategies: thin keyword-only wrappers of :class:`ViTTemplate`.

Each class takes its attributes from its :mod:`cl_hres.registry` entry; a registered
strategy without a class of its own gets one derived from the template.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from avalanche.training.supervised import JointTraining
from avalanche.training.templates import SupervisedTemplate

from cl_hres import registry
from cl_hres.avalanche.template import ViTTemplate
from cl_hres.nn.coda_prompt import CodaPromptViT
from cl_hres.nn.dual_prompt import DualPromptViT
from cl_hres.nn.prompt_pool import PromptPoolViT
from cl_hres.nn.routing import RoutedExpertsViT
from cl_hres.nn.views import ExpertViewsViT

__all__ = [
    "STRATEGIES",
    "FineTune",
    "CodaPrompt",
    "DualPrompt",
    "ExpertViews",
    "RoutedExperts",
    "FirstSessionAdaptation",
    "HRes",
    "HResNSP",
    "L2P",
    "Joint",
    "LinearProbe",
    "LoRA",
    "LoRANSP",
    "RanPAC",
    "SimpleCIL",
    "VPT",
    "ViTTemplate",
    "strategy_class",
]


def _configure(cls: type, spec: registry.StrategySpec) -> type:
    """Sets a strategy class's attributes from its registry entry (one source of truth)."""
    cls.name = spec.name
    cls.method = spec.method_name
    cls.config_type = spec.method_spec.config_class
    cls.expert_per_experience = spec.expert_per_experience
    cls.uses_nsp = spec.uses_nsp
    cls.trains_whole_stream = spec.trains_whole_stream
    cls.concat_pretrained = spec.concat_pretrained
    cls.adapt_experiences = spec.adapt_experiences
    cls.default_head = spec.head or "ridge"
    cls.default_ridge_projection = spec.ridge_projection or 0
    return cls


def _from_registry(name: str) -> Callable[[type], type]:
    """Class decorator for the built-in strategies: attributes from ``registry``."""
    return lambda cls: _configure(cls, registry.STRATEGIES[name])


_DERIVED: dict[str, type] = {}


def strategy_class(name: str) -> type[SupervisedTemplate]:
    """The Avalanche strategy class registered as ``name``.

    A registered strategy without a class of its own gets a sequential cl-hres strategy
    derived from its :class:`~cl_hres.registry.StrategySpec`.
    """
    spec = registry.STRATEGIES[name]
    if spec.strategy_class is not None:
        return registry.resolve(spec.strategy_class)
    if name not in _DERIVED:
        cls = type(name.title().replace("-", ""), (ViTTemplate,), {"__doc__": spec.summary})
        _DERIVED[name] = _configure(cls, spec)
    return _DERIVED[name]


class _StrategyClasses(Mapping):
    """Registered strategy names → classes (a live view of :mod:`cl_hres.registry`)."""

    def __getitem__(self, name: str) -> type[SupervisedTemplate]:
        return strategy_class(name)

    def __iter__(self) -> Iterator[str]:
        return iter(registry.strategy_names())

    def __len__(self) -> int:
        return len(registry.STRATEGIES)


STRATEGIES: Mapping[str, type[SupervisedTemplate]] = _StrategyClasses()


@_from_registry("hres-nsp")
class HResNSP(ViTTemplate):
    """H-Res expert per experience with null-space projection (the proposed method)."""


@_from_registry("hres")
class HRes(ViTTemplate):
    """H-Res expert per experience, older experts frozen, no projection."""


@_from_registry("lora")
class LoRA(ViTTemplate):
    """Sequential LoRA: one low-rank adapter trained on every experience in turn."""


@_from_registry("lora-nsp")
class LoRANSP(ViTTemplate):
    """A LoRA branch per experience with ``A`` kept in the old inputs' null space (InfLoRA idea)."""


@_from_registry("vpt")
class VPT(ViTTemplate):
    """Sequential visual prompt tuning (shallow or deep)."""


@_from_registry("l2p")
class L2P(ViTTemplate):
    """Learning to Prompt: prompts from a pool, chosen per image by key matching.

    The keys are trained towards the queries of the images that chose them (the loss of
    :meth:`PromptPoolViT.auxiliary_loss`); the prompts and the head by the task loss.
    """

    model_class = PromptPoolViT


@_from_registry("dualprompt")
class DualPrompt(ViTTemplate):
    """DualPrompt: a shared G-prompt, an E-prompt per experience chosen by key at test time."""

    model_class = DualPromptViT


@_from_registry("coda-prompt")
class CodaPrompt(ViTTemplate):
    """CODA-Prompt: each block's prompt a query-weighted sum of components, new per experience."""

    model_class = CodaPromptViT


@_from_registry("linear")
class LinearProbe(ViTTemplate):
    """Frozen backbone; only the head learns."""


@_from_registry("aper")
class FirstSessionAdaptation(ViTTemplate):
    """First-session adaptation (APER / RanPAC), a reference point of PTM-based CIL.

    One H-Res expert is trained on the first experience only, then frozen; the head reads
    ``[pretrained(x), adapted(x)]`` (APER's concatenation).
    """


@_from_registry("finetune")
class FineTune(ViTTemplate):
    """Every backbone weight trained on each experience in turn (forgets most)."""


@_from_registry("joint")
class Joint(ViTTemplate, JointTraining):
    """One H-Res expert trained on all experiences at once: the upper bound.

    Call ``train`` once with the whole train stream.
    """


@_from_registry("simplecil")
class SimpleCIL(ViTTemplate):
    """SimpleCIL: cosine to the class means of the frozen pretrained backbone."""


@_from_registry("ranpac")
class RanPAC(ViTTemplate):
    """RanPAC: a first-experience expert, a random ReLU projection, a Gram ridge head.

    The expert trains on the first experience only; the head reads the adapted features
    through the projection, its λ chosen by GCV at every fit.
    """


@_from_registry("hres-views")
class ExpertViews(ViTTemplate):
    """An H-Res expert per experience, trained alone; the head reads every expert's view.

    Old classes' prototypes in a new view come from class similarities in the pretrained
    view (EASE's prototype complement): exemplar-free (:mod:`cl_hres.nn.views`).
    """

    model_class = ExpertViewsViT


@_from_registry("hres-routed")
class RoutedExperts(ViTTemplate):
    """An H-Res expert and a ridge head per experience, trained alone, behind a router.

    The router is RanPAC's head on the first expert's view; it picks the experience whose
    own head names the class. Exemplar-free (:mod:`cl_hres.nn.routing`).
    """

    model_class = RoutedExpertsViT
