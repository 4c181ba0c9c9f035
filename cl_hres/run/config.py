"""The configuration of one run: every CLI / YAML option, validated before heavy work."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cl_hres import registry
from cl_hres.errors import ConfigError
from cl_hres.nn.config import (
    CodaPromptConfig,
    DualPromptConfig,
    HResConfig,
    L2PConfig,
    LoRAConfig,
    VPTConfig,
)
from cl_hres.nsp.config import NullSpaceConfig
from cl_hres.run.validation import validate

__all__ = [
    "DEFAULT_BACKBONE",
    "LEGACY_DEFAULTS",
    "RESUMABLE_KEYS",
    "RunConfig",
    "changed_on_resume",
]

# Options a resumed run may change: where it runs and reads, not what it learns.
RESUMABLE_KEYS = ("device", "data_root", "num_workers")


# Options added after runs were saved, with the value that reproduces a run saved without
# them (a resumed run must go on as it started).
LEGACY_DEFAULTS: dict[str, Any] = {
    "nsp_min_free_energy": 0.0,
    "nsp_min_selectivity": 0.0,
    "class_order": "seeded",
    "initial_classes": None,
    "increment": None,
    "balanced_head": False,
}


def with_legacy_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` with every :data:`LEGACY_DEFAULTS` key it lacks."""
    return {**LEGACY_DEFAULTS, **saved}


def changed_on_resume(
    saved: Mapping[str, Any], given: Mapping[str, Any]
) -> tuple[str, Any, Any] | None:
    """The first option both know, other than :data:`RESUMABLE_KEYS`, that differs.

    A key that ``saved`` lacks because it was written before the option existed counts
    with its :data:`LEGACY_DEFAULTS` value.

    Returns:
        ``(key, saved value, given value)``, or None when a resume may go on.
    """
    saved = with_legacy_defaults(saved)
    for key, value in given.items():
        if key in saved and key not in RESUMABLE_KEYS and saved[key] != value:
            return key, saved[key], value
    return None


# The embedded default's backbone: cl-hres's own ViT pretrained on Fashion-MNIST, shipped
# as package data (cl_hres.nn.backbones; the name is repeated here so that validating a config
# does not import timm). ``pretrained: false`` gives the same architecture, random-init.
DEFAULT_BACKBONE = "vit_pico_patch7_28.fmnist"


def _mirror(config_type: type, name: str) -> Any:
    """A RunConfig field mirroring ``config_type.name``: same default and help.

    Tuple-valued options (blocks, LoRA targets) are comma-separated strings on the command
    line and in YAML (lists are accepted too) and become tuples in the method config.
    """
    source = {f.name: f for f in dataclasses.fields(config_type)}[name]
    default = source.default
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default)
    element = {"blocks": int, "g_blocks": int, "e_blocks": int, "targets": str}.get(name)
    return field(
        default=default,
        metadata={"help": source.metadata["help"], "mirrors": (config_type, name, element)},
    )


def _to_source_type(option: str, value: Any, element: type | None) -> Any:
    """A mirrored option's value as its method config takes it."""
    if element is None or value is None:
        return value
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{option} must be a comma-separated list, got {value!r}")
    try:
        return tuple(element(str(v).strip()) for v in items if str(v).strip())
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got {value!r}") from None


@dataclass
class RunConfig:
    """Everything that defines a run; ``resolved()`` fills benchmark-dependent defaults."""

    benchmark: str = field(default="split-digits", metadata={"help": "Name, .npz or folder."})
    strategy: str = field(default="hres-nsp", metadata={"help": "Strategy name."})
    scenario: str = field(default="class", metadata={"help": "class or task incremental."})
    experiences: int | str | None = field(
        default=None,
        metadata={"help": "Experiences in the stream, or by-domain (one per domain of the data)."},
    )
    class_order: Any = field(
        default="seeded",
        metadata={
            "help": "seeded (permutation drawn from --seed), fixed (labels 0..C-1), a comma "
            "list, or a file of the labels in order."
        },
    )
    initial_classes: int | None = field(
        default=None, metadata={"help": "Classes of the first experience (B in BxIncy)."}
    )
    increment: int | None = field(
        default=None, metadata={"help": "Classes of each later experience (Inc in BxIncy)."}
    )
    backbone: str = field(
        default=DEFAULT_BACKBONE, metadata={"help": "timm model name (with pretrained tag)."}
    )
    backbone_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Extra VisionTransformer arguments."}
    )
    pretrained: bool = field(
        default=True, metadata={"help": "Load the backbone's pretrained weights (false: random)."}
    )
    weights: str | None = field(default=None, metadata={"help": "Local weights file."})
    img_size: int | None = field(
        default=None,
        metadata={"help": "Input resolution (default: the backbone's pretrained one)."},
    )
    augment: str = field(
        default="auto",
        metadata={"help": "Training augmentation: auto, crop-flip, crop or none."},
    )
    epochs: int = field(default=5, metadata={"help": "Epochs per experience."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed of class order, init and batches."})
    device: str = field(
        default="auto",
        metadata={"help": "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."},
    )
    bf16: bool = field(
        default=False, metadata={"help": "bfloat16 autocast (statistics stay float64)."}
    )
    num_workers: int | str = field(
        default="auto",
        metadata={
            "help": "DataLoader worker processes, or auto: none for in-memory data on the "
            "CPU, cores - 1 (at most 8) for decoded images on a GPU (docs/costs.md)."
        },
    )
    data_root: str = field(default="data", metadata={"help": "Where datasets live."})
    head: str | None = field(default=None, metadata={"help": "ridge, ncm or linear."})
    ridge: float | str = field(
        default="auto",
        metadata={"help": "Relative ridge penalty, or auto (GCV on the statistics)."},
    )
    ridge_projection: int | None = field(
        default=None,
        metadata={"help": "Random ReLU projection width of the ridge head (0: none)."},
    )
    # On: split-domains validation 78.7 vs 70.1% (aper), 73.3 vs 60.7% (linear);
    # split-digits 94.05 both (aper), 92.2 vs 91.8% (linear) (docs/defaults.md).
    balanced_head: bool = field(
        default=True,
        metadata={
            "help": "Weight every class equally in the ridge head's statistics, however "
            "many images its experience has."
        },
    )
    # Method options: default and help come from the method's own dataclass (one source).
    rank: int = _mirror(HResConfig, "rank")
    scale: float = _mirror(HResConfig, "scale")
    blocks: str | None = _mirror(HResConfig, "blocks")
    hres_input: str = _mirror(HResConfig, "input")
    nsp_rule: str = _mirror(NullSpaceConfig, "rule")
    nsp_threshold: float = _mirror(NullSpaceConfig, "threshold")
    nsp_eta: float = _mirror(NullSpaceConfig, "eta")
    nsp_min_free_energy: float = _mirror(NullSpaceConfig, "min_free_energy")
    nsp_min_selectivity: float = _mirror(NullSpaceConfig, "min_selectivity")
    nsp_separate_prefix: bool = _mirror(NullSpaceConfig, "separate_prefix")
    nsp_precision: str = _mirror(NullSpaceConfig, "precision")
    lora_rank: int = _mirror(LoRAConfig, "rank")
    lora_alpha: float = _mirror(LoRAConfig, "alpha")
    lora_targets: str = _mirror(LoRAConfig, "targets")
    lora_blocks: str | None = _mirror(LoRAConfig, "blocks")
    vpt_length: int = _mirror(VPTConfig, "length")
    vpt_deep: bool = _mirror(VPTConfig, "deep")
    l2p_pool_size: int = _mirror(L2PConfig, "pool_size")
    l2p_length: int = _mirror(L2PConfig, "length")
    l2p_top_k: int = _mirror(L2PConfig, "top_k")
    l2p_key_loss_weight: float = _mirror(L2PConfig, "key_loss_weight")
    dualprompt_g_length: int = _mirror(DualPromptConfig, "g_length")
    dualprompt_g_blocks: str = _mirror(DualPromptConfig, "g_blocks")
    dualprompt_e_length: int = _mirror(DualPromptConfig, "e_length")
    dualprompt_e_blocks: str = _mirror(DualPromptConfig, "e_blocks")
    dualprompt_pool_size: int = _mirror(DualPromptConfig, "pool_size")
    dualprompt_key_loss_weight: float = _mirror(DualPromptConfig, "key_loss_weight")
    coda_prompt_pool_size: int = _mirror(CodaPromptConfig, "pool_size")
    coda_prompt_length: int = _mirror(CodaPromptConfig, "length")
    coda_prompt_blocks: str = _mirror(CodaPromptConfig, "blocks")
    coda_prompt_tasks: int = _mirror(CodaPromptConfig, "tasks")
    coda_prompt_ortho_weight: float = _mirror(CodaPromptConfig, "ortho_weight")
    validation: float = field(
        default=0.0, metadata={"help": "Train fraction held out as the evaluation set."}
    )
    drift_compensation: bool = field(
        default=False,
        metadata={
            "help": "Map the statistics head's stored sums through the feature drift "
            "measured on each new experience (ridge/ncm heads)."
        },
    )
    concat_pretrained: bool | None = field(
        default=None,
        metadata={
            "help": "Head reads [pretrained, adapted] features (APER); default: the "
            "strategy's choice. Methods that can be switched off only (hres, lora, vpt)."
        },
    )
    fwt_reference: bool = field(
        default=True,
        metadata={
            "help": "Train each experience alone (cached) to report forward transfer "
            "for every strategy and head."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the first bad value (:mod:`cl_hres.run.validation`)."""
        validate(self)

    def resolve_device(self) -> str:
        """Turns ``auto`` into ``cuda`` or ``cpu`` and checks the device exists here.

        Returns the device (also stored in :attr:`device`, so results.json records the
        one used). Raises ConfigError for a CUDA device this machine does not have.
        """
        import torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            return self.device
        if not torch.cuda.is_available():
            raise ConfigError(f"device {self.device} requested but CUDA is not available")
        index = int(self.device.split(":")[1]) if ":" in self.device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {self.device} does not exist ({torch.cuda.device_count()} GPUs)"
            )
        return self.device

    # -------------------------------------------------------- derived configs
    def _mirrored(self, config_type: type) -> Any:
        """Builds ``config_type`` from the fields that mirror it (it validates itself)."""
        kwargs = {}
        for f in dataclasses.fields(self):
            source = f.metadata.get("mirrors")
            if source and source[0] is config_type:
                kwargs[source[1]] = _to_source_type(f.name, getattr(self, f.name), source[2])
        return config_type(**kwargs)

    def hres_config(self) -> HResConfig:
        """The H-Res config these options describe."""
        return self._mirrored(HResConfig)

    def lora_config(self) -> LoRAConfig:
        """The LoRA config these options describe."""
        return self._mirrored(LoRAConfig)

    def vpt_config(self) -> VPTConfig:
        """The VPT config these options describe."""
        return self._mirrored(VPTConfig)

    def nsp_config(self) -> NullSpaceConfig:
        """The null-space rule these options describe."""
        return self._mirrored(NullSpaceConfig)

    def ridge_value(self) -> float | None:
        """The ridge penalty for the head: None means chosen by GCV."""
        return None if self.ridge == "auto" else float(self.ridge)

    @property
    def spec(self) -> registry.StrategySpec:
        """The chosen strategy's registry entry."""
        return registry.STRATEGIES[self.strategy]

    def resolve_strategy_defaults(self) -> None:
        """Fills the head and projection the run leaves to the strategy (recorded so)."""
        if self.head is None:
            self.head = self.spec.head or "ridge"
        if self.ridge_projection is None:
            self.ridge_projection = self.spec.ridge_projection or 0

    def head_reads_pretrained(self) -> bool:
        """Whether the head reads ``[pretrained, adapted]`` features (unset: the strategy's)."""
        if self.concat_pretrained is None:
            return self.spec.concat_pretrained
        return self.concat_pretrained

    def method_config(self) -> Any:
        """The config the chosen strategy's method takes (its defaults for a new method)."""
        config_type = self.spec.method_spec.config_class
        return None if config_type is None else self._mirrored(config_type)

    def mirrored_configs(self) -> list[Any]:
        """Every method and NSP config the options describe (each validates itself)."""
        types = dict.fromkeys(
            f.metadata["mirrors"][0] for f in dataclasses.fields(self) if "mirrors" in f.metadata
        )
        return [self._mirrored(t) for t in types]

    def backbone_arguments(self, channels: int) -> dict[str, Any]:
        """Keyword arguments of :func:`~cl_hres.nn.backbones.create_backbone`.

        The input size is the backbone's pretrained one unless ``img_size`` says otherwise
        (timm then resamples the position embeddings); the patch embedding takes the
        data's channel count (timm adapts pretrained weights to it).
        """
        kwargs: dict[str, Any] = dict(self.backbone_kwargs or {})
        patch = kwargs.get("patch_size")
        # Only the value here; whether the image fits the patch is checked on the built
        # model (cl_hres.run.prepare), which also covers timm's default patch size.
        if patch is not None and (
            isinstance(patch, bool) or not isinstance(patch, int) or patch < 1
        ):
            raise ConfigError(f"patch_size must be a positive integer, got {patch!r}")
        if self.img_size is not None:
            kwargs["img_size"] = self.img_size
        return dict(kwargs, in_chans=channels)

    def to_dict(self) -> dict[str, Any]:
        """The options as a JSON-serialisable mapping (config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """Builds a config, rejecting unknown keys with a close-match suggestion."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise ConfigError(f"{source}: unknown option {key!r}{hint}")
        try:
            return cls(**values)
        except TypeError as exc:  # e.g. a list where a string is expected
            raise ConfigError(f"{source}: {exc}") from None
