"""The configuration of one run: every CLI / YAML option, validated before heavy work."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_hres.config import HEAD_CHOICES, HResConfig, LoRAConfig, NullSpaceConfig, VPTConfig
from cl_hres.errors import ConfigError
from cl_hres.transforms import AUGMENT_CHOICES

__all__ = ["DEFAULT_BACKBONE", "STRATEGY_NAMES", "RunConfig", "load_yaml_config"]

# Kept here rather than imported from cl_hres.strategies so that validating a config needs
# no Avalanche import (6 s); a test checks both lists agree.
STRATEGY_NAMES = ("finetune", "hres", "hres-nsp", "joint", "linear", "lora", "lora-nsp", "vpt")

# The embedded default's backbone: cl-hres's own ViT pretrained on Fashion-MNIST, shipped
# as package data (cl_hres.backbones; the name is repeated here so that validating a config
# does not import timm). ``pretrained: false`` gives the same architecture, random-init.
DEFAULT_BACKBONE = "vit_pico_patch7_28.fmnist"


@dataclass
class RunConfig:
    """Everything that defines a run; ``resolved()`` fills benchmark-dependent defaults."""

    benchmark: str = field(default="split-digits", metadata={"help": "Name, .npz or folder."})
    strategy: str = field(default="hres-nsp", metadata={"help": "Strategy name."})
    scenario: str = field(default="class", metadata={"help": "class or task incremental."})
    experiences: int | None = field(default=None, metadata={"help": "Experiences in the stream."})
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
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N."})
    bf16: bool = field(
        default=False, metadata={"help": "bfloat16 autocast (statistics stay float64)."}
    )
    data_root: str = field(default="data", metadata={"help": "Where datasets live."})
    head: str = field(default="ridge", metadata={"help": "ridge, ncm or linear."})
    ridge: float | str = field(
        default="auto",
        metadata={"help": "Relative ridge penalty, or auto (GCV on the statistics)."},
    )
    ridge_projection: int = field(
        default=0, metadata={"help": "Random ReLU projection width of the ridge head (0: none)."}
    )
    rank: int = field(default=32, metadata={"help": "H-Res expert rank r."})
    scale: float = field(default=1.0, metadata={"help": "H-Res scale λ."})
    nsp_rule: str = field(default="relative", metadata={"help": "energy, ratio or relative."})
    nsp_threshold: float = field(default=1e-4, metadata={"help": "Parameter of the rule."})
    nsp_eta: float = field(default=1.0, metadata={"help": "Projector relaxation η."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lora_targets: str = field(default="attn", metadata={"help": "attn, mlp or attn,mlp."})
    vpt_length: int = field(default=10, metadata={"help": "VPT prompt length."})
    vpt_deep: bool = field(default=True, metadata={"help": "Deep (per-block) prompts."})
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
    fwt_reference: bool = field(
        default=True,
        metadata={
            "help": "Train each experience alone (cached) to report forward transfer "
            "for every strategy and head."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raises ConfigError naming the first bad value."""
        if self.strategy not in STRATEGY_NAMES:
            close = difflib.get_close_matches(self.strategy, STRATEGY_NAMES, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"unknown strategy {self.strategy!r}{hint} (choose from {', '.join(STRATEGY_NAMES)})"
            )
        if self.scenario not in ("class", "task"):
            raise ConfigError(f"scenario must be class or task, got {self.scenario!r}")
        if self.augment not in AUGMENT_CHOICES:
            raise ConfigError(
                f"augment must be one of {', '.join(AUGMENT_CHOICES)}, got {self.augment!r}"
            )
        if self.head not in HEAD_CHOICES:
            raise ConfigError(f"head must be one of {', '.join(HEAD_CHOICES)}, got {self.head!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            _positive_int(name, getattr(self, name))
        if self.experiences is not None:
            _positive_int("experiences", self.experiences)
        if self.img_size is not None:
            _positive_int("img_size", self.img_size)
        if (
            isinstance(self.ridge_projection, bool)
            or not isinstance(self.ridge_projection, int)
            or self.ridge_projection < 0
        ):
            raise ConfigError(
                f"ridge_projection must be an integer >= 0, got {self.ridge_projection!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        _positive_float("lr", self.lr)
        if self.ridge != "auto":
            _positive_float("ridge", self.ridge)
        if (
            not _is_number(self.weight_decay)
            or not math.isfinite(self.weight_decay)
            or self.weight_decay < 0
        ):
            raise ConfigError(
                f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}"
            )
        if not _is_number(self.validation) or not 0 <= self.validation < 1:
            raise ConfigError(f"validation must be in [0, 1), got {self.validation!r}")
        if self.backbone_kwargs is not None and not isinstance(self.backbone_kwargs, dict):
            raise ConfigError("backbone_kwargs must be a mapping")
        for name in ("pretrained", "vpt_deep", "bf16", "fwt_reference", "drift_compensation"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        # The method configs validate their own fields.
        self.hres_config()
        self.lora_config()
        self.vpt_config()
        self.nsp_config()

    def check_device(self) -> None:
        """Raises ConfigError if the device is not available here."""
        if self.device == "cpu":
            return
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {self.device} requested but CUDA is not available")
        index = int(self.device.split(":")[1]) if ":" in self.device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {self.device} does not exist ({torch.cuda.device_count()} GPUs)"
            )

    # -------------------------------------------------------- derived configs
    def hres_config(self) -> HResConfig:
        return HResConfig(rank=self.rank, scale=self.scale)

    def lora_config(self) -> LoRAConfig:
        targets = tuple(t.strip() for t in str(self.lora_targets).split(",") if t.strip())
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=targets)

    def vpt_config(self) -> VPTConfig:
        return VPTConfig(length=self.vpt_length, deep=self.vpt_deep)

    def nsp_config(self) -> NullSpaceConfig:
        return NullSpaceConfig(rule=self.nsp_rule, threshold=self.nsp_threshold, eta=self.nsp_eta)

    def ridge_value(self) -> float | None:
        """The ridge penalty for the head: None means chosen by GCV."""
        return None if self.ridge == "auto" else float(self.ridge)

    def method_config(self) -> HResConfig | LoRAConfig | VPTConfig | None:
        """The config the chosen strategy's method takes."""
        if self.strategy.startswith("lora"):
            return self.lora_config()
        if self.strategy == "vpt":
            return self.vpt_config()
        if self.strategy in ("hres", "hres-nsp", "joint"):
            return self.hres_config()
        return None

    def backbone_arguments(self, channels: int) -> dict[str, Any]:
        """Keyword arguments of :func:`~cl_hres.backbones.create_backbone`.

        The input size is the backbone's pretrained one unless ``img_size`` says otherwise
        (timm then resamples the position embeddings); the patch embedding takes the
        data's channel count (timm adapts pretrained weights to it).
        """
        kwargs: dict[str, Any] = dict(self.backbone_kwargs or {})
        patch = kwargs.get("patch_size")
        # Only the value here; whether the image fits the patch is checked on the built
        # model (runner.prepare), which also covers timm's default patch size.
        if patch is not None and (
            isinstance(patch, bool) or not isinstance(patch, int) or patch < 1
        ):
            raise ConfigError(f"patch_size must be a positive integer, got {patch!r}")
        if self.img_size is not None:
            kwargs["img_size"] = self.img_size
        return dict(kwargs, in_chans=channels)

    def to_dict(self) -> dict[str, Any]:
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


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Reads a YAML run recipe into a dict (keys as in :class:`RunConfig`, ``-`` or ``_``).

    Numbers in exponent notation without a dot (``1e-8``) are floats, as in YAML 1.2;
    PyYAML's YAML 1.1 resolver would read them as strings.
    """
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    # YAML 1.2's float syntax; PyYAML copies the resolver table before adding to a subclass.
    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$",
        ),
        list("-+0123456789."),
    )
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader: no objects
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _positive_float(name: str, v: Any) -> None:
    if not _is_number(v) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
