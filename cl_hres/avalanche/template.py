"""The base Avalanche template of every cl-hres strategy on a timm ViT.

It wraps the given timm ``VisionTransformer`` in a :class:`~cl_hres.nn.model.ContinualViT`
with the same head protocol, builds an AdamW optimizer over the trainable parameters when
none is given (rebuilt at each experience, over the parameters trainable then), and passes
task labels to the model so task-incremental streams get one head per task while
class-incremental streams need no task id. The algorithms live in the plugins it attaches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cl_hres import distributed
from cl_hres.avalanche.drift_plugin import FeatureDriftPlugin
from cl_hres.avalanche.nsp_plugin import NullSpaceProjectionPlugin
from cl_hres.avalanche.vit_plugin import ContinualViTPlugin
from cl_hres.data.loaders import WorkerSafeDataset, loader_kwargs
from cl_hres.errors import ConfigError
from cl_hres.nn.config import HResConfig, LoRAConfig, VPTConfig
from cl_hres.nn.model import ContinualViT
from cl_hres.nsp.config import NullSpaceConfig

__all__ = ["ViTTemplate"]


def _optimizer_factory(
    optimizer: torch.optim.Optimizer | None, lr: float, weight_decay: float
) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """A factory rebuilding ``optimizer`` (its class and defaults) over new parameters."""
    if optimizer is None:
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    opt_type, defaults = type(optimizer), dict(optimizer.defaults)
    return lambda params: opt_type(params, **defaults)


class ViTTemplate(SupervisedTemplate):
    """Base of the cl-hres strategies; the class attributes come from a registry entry.

    Args:
        model: A timm VisionTransformer, or a ready :class:`ContinualViT`.
        optimizer: Its class and hyper-parameters are reused at every experience over
            the parameters trainable then; default AdamW(lr, weight_decay).
        lr: Learning rate of the default optimizer.
        weight_decay: Weight decay of the default optimizer.
        criterion: Loss; default cross-entropy.
        train_mb_size: Training batch size.
        train_epochs: Epochs per experience.
        eval_mb_size: Evaluation batch size.
        device: Torch device.
        plugins: Extra Avalanche plugins (run after this strategy's own).
        evaluator: Avalanche EvaluationPlugin.
        eval_every: As in Avalanche.
        head: Evaluation head protocol: ``ridge``, ``ncm`` or ``linear``; None: the
            strategy's (``ncm`` for SimpleCIL, else ``ridge``).
        ridge: Relative ridge penalty of the ``ridge`` head; None: chosen by GCV.
        ridge_projection: Width of the ridge head's random ReLU projection (0: none);
            None: the strategy's (2,000 for RanPAC, else 0).
        balanced_head: Weight every class equally in the ridge head's statistics, however
            many images it has (:class:`~cl_hres.nn.heads.RidgeHead`).
        drift_compensation: Map the statistics head's stored sums through the feature
            drift measured on each new experience's data (cl_hres.nn.drift_compensation).
        concat_pretrained: Head features ``[pretrained(x), adapted(x)]`` (APER); None:
            the strategy's default.
        method_config: Config of the strategy's method (HRes/LoRA/VPT).
        nsp_config: Null-space rule for the ``*-nsp`` strategies.
        num_classes: Classes known up front (optional; the head grows as needed).
        seed: Seed of the training data order (with the experience and epoch).
        bf16: Run the training forward passes under bfloat16 autocast. Evaluation and
            statistics passes stay float32; covariances and heads are float64.
        **kwargs: Passed on to the Avalanche template.
    """

    name: ClassVar[str] = ""
    method: ClassVar[str] = "hres"
    expert_per_experience: ClassVar[bool] = True
    uses_nsp: ClassVar[bool] = False
    trains_whole_stream: ClassVar[bool] = False
    config_type: ClassVar[type | None] = HResConfig
    concat_pretrained: ClassVar[bool] = False
    adapt_experiences: ClassVar[int | None] = None
    default_head: ClassVar[str] = "ridge"
    # The model class a strategy builds (a subclass changes how the head reads features).
    model_class: ClassVar[type[ContinualViT]] = ContinualViT
    default_ridge_projection: ClassVar[int] = 0

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        criterion: nn.Module | None = None,
        train_mb_size: int = 32,
        train_epochs: int = 1,
        eval_mb_size: int = 128,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] | None = None,
        evaluator: Any = default_evaluator,
        eval_every: int = -1,
        head: str | None = None,
        ridge: float | None = None,
        ridge_projection: int | None = None,
        balanced_head: bool = True,
        drift_compensation: bool = False,
        concat_pretrained: bool | None = None,
        method_config: HResConfig | LoRAConfig | VPTConfig | None = None,
        nsp_config: NullSpaceConfig | None = None,
        num_classes: int = 0,
        seed: int = 0,
        bf16: bool = False,
        **kwargs: Any,
    ) -> None:
        """Builds the model (unless ready), the optimizer factory and the plugins."""
        if isinstance(model, ContinualViT):
            self._check_ready_model(model, concat_pretrained)
        else:
            model = self.build_model(
                model,
                method_config=method_config,
                head=head,
                ridge=ridge,
                ridge_projection=ridge_projection,
                balanced_head=balanced_head,
                drift_compensation=drift_compensation,
                concat_pretrained=concat_pretrained,
                num_classes=num_classes,
            )
        self._optimizer_factory = _optimizer_factory(optimizer, lr, weight_decay)
        self.seed, self.bf16 = seed, bf16
        self._ddp: nn.Module | None = None
        super().__init__(
            model=model,
            # Avalanche wants an optimizer now; make_optimizer replaces it per experience.
            optimizer=self._optimizer_factory(list(model.parameters())),
            criterion=criterion or nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=[*self._own_plugins(model, nsp_config), *(plugins or [])],
            evaluator=evaluator,
            eval_every=eval_every,
            **kwargs,
        )

    def _own_plugins(self, model: ContinualViT, nsp_config: NullSpaceConfig | None) -> list:
        """The strategy's own plugins: the ViT bookkeeping, drift, and NSP if it uses it."""
        # Drift is measured for every strategy: it tells feature drift from head confusion.
        self.drift_plugin = FeatureDriftPlugin()
        own: list[Any] = [ContinualViTPlugin(), self.drift_plugin]
        self.nsp_plugin: NullSpaceProjectionPlugin | None = None
        if self.uses_nsp:
            self.nsp_plugin = NullSpaceProjectionPlugin(nsp_config)
            # The NSP state is part of the model from the start, so a checkpoint's model
            # state dict (covariances, projectors) loads into a freshly built strategy.
            self.nsp_plugin.attach(model)
            own.append(self.nsp_plugin)
        return own

    def _check_ready_model(self, model: ContinualViT, concat_pretrained: bool | None) -> None:
        """Raises ConfigError unless a ready model has this strategy's structure."""
        if not isinstance(model, self.model_class):
            raise ConfigError(f"{self.name} needs a {self.model_class.__name__} model")
        # A ready model keeps its own head features unless the caller asks otherwise.
        wanted = {
            "method": self.method,
            "expert_per_experience": self.expert_per_experience,
            "adapt_experiences": self.adapt_experiences,
        }
        if concat_pretrained is not None:
            wanted["concat_pretrained"] = concat_pretrained
        for key, value in wanted.items():
            if getattr(model, key) != value:
                raise ConfigError(
                    f"{self.name} needs a model with {key}={value}, got {getattr(model, key)}"
                    f" (build it with {type(self).__name__}.build_model)"
                )

    @classmethod
    def build_model(
        cls,
        backbone: nn.Module,
        *,
        method_config: Any = None,
        concat_pretrained: bool | None = None,
        **head_options: Any,
    ) -> ContinualViT:
        """The strategy's :class:`ContinualViT` around a timm ViT (also rebuilds a run's).

        Args:
            backbone: A timm VisionTransformer.
            method_config: Config of the strategy's method; None: its defaults.
            concat_pretrained: Head features ``[pretrained(x), adapted(x)]``; None: the
                strategy's default.
            **head_options: ``head``, ``ridge``, ``ridge_projection``, ``balanced_head``,
                ``drift_compensation``, ``num_classes`` (see :class:`ContinualViT`); the
                strategy's head and projection unless given.
        """
        if method_config is not None and not isinstance(method_config, cls.config_type or ()):
            raise ConfigError(
                f"{cls.name} takes a {getattr(cls.config_type, '__name__', 'no')} config, "
                f"got {type(method_config).__name__}"
            )
        if head_options.get("head") is None:
            head_options["head"] = cls.default_head
        if head_options.get("ridge_projection") is None:
            head_options["ridge_projection"] = cls.default_ridge_projection
        return cls.model_class(
            backbone,
            method=cls.method,
            method_config=method_config,
            expert_per_experience=cls.expert_per_experience,
            concat_pretrained=cls.concat_pretrained
            if concat_pretrained is None
            else concat_pretrained,
            adapt_experiences=cls.adapt_experiences,
            **head_options,
        )

    def forward(self) -> torch.Tensor:
        """The model's logits for the current mini-batch (bf16 autocast in training only)."""
        # Task labels reach the model whenever batches carry them (x, y, t): the model
        # decides whether they restrict the classes.
        task_labels = self.mbatch[2] if len(self.mbatch) >= 3 else None
        model = self._ddp if (self._ddp is not None and self.is_training) else self.model
        device_type = torch.device(self.device).type
        # bf16 only for the training forward: the closed-form heads are fitted on float32
        # features and, with a small ridge, amplify bf16 rounding (measured: 97% -> 39%
        # accuracy when evaluating under autocast), so evaluation stays float32.
        amp = self.bf16 and self.is_training
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=amp):
            out = model(self.mb_x, task_labels=task_labels)
        # Loss and metrics in float32 (-inf masks survive the cast).
        return out.float()

    def criterion(self) -> torch.Tensor:
        """The task loss, plus the model's own term in training (:meth:`auxiliary_loss`)."""
        loss = super().criterion()
        extra = self.model.auxiliary_loss() if self.is_training else None
        return loss if extra is None else loss + extra.float()

    def _train_exp(self, experience: Any, eval_streams: Any = None, **kwargs: Any) -> None:
        # Nothing but the training head would learn, and a statistics head is fitted in
        # closed form after the experience without reading it (linear probe; APER after
        # its first session; NSP banks all closed or dormant): the epochs would change no
        # result, so none runs, and no epoch metric logs a loss of nothing.
        model = self.model
        self.trained_last_experience = not (
            model.has_statistics_pass and model.adapter_parameter_count() == 0
        )
        if self.trained_last_experience:
            super()._train_exp(experience, eval_streams, **kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        """A fresh optimizer over the parameters trainable now (DDP-wrapped when distributed)."""
        # Avalanche's default hands frozen parameters to the optimizer too and mis-assigns
        # new ones with several param groups; a fresh optimizer per experience over the
        # trainable parameters is what every method here expects.
        params = self.model.trainable_parameters()
        if not params:
            return
        self.optimizer = self._optimizer_factory(params)
        if distributed.is_distributed():
            # Rebuilt per experience: DDP needs a fixed set of trainable parameters.
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.model.device.index] if self.model.device.type == "cuda" else None
            # Buffers (head and covariance statistics) are combined by explicit
            # all-reduces and equal on every rank; broadcasting them before every forward
            # would send the covariances (~10 MB per ViT-B block) at each step.
            self._ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)

    def make_train_dataloader(
        self,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        """The training loader: a seeded DistributedSampler, the batch split across processes."""
        # A DistributedSampler in every case (one replica when alone): its order depends
        # only on (seed, experience, epoch), so a resumed run replays it exactly and N
        # processes see, batch for batch, the same images as one process.
        world = distributed.world_size()
        sampler = DistributedSampler(
            self.adapted_dataset,
            num_replicas=world,
            rank=distributed.rank(),
            shuffle=shuffle,
            seed=self.seed,
        )
        self.dataloader = DataLoader(
            WorkerSafeDataset(self.adapted_dataset),
            batch_size=max(1, self.train_mb_size // world),
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=getattr(self.adapted_dataset, "collate_fn", None),
            **loader_kwargs(self.device, num_workers, pin_memory, persistent_workers),
        )

    def _before_training_epoch(self, **kwargs: Any) -> None:
        index = getattr(self.experience, "current_experience", 0)
        self.dataloader.sampler.set_epoch(1000 * index + self.clock.train_exp_epochs)
        super()._before_training_epoch(**kwargs)

    def make_eval_dataloader(
        self,
        num_workers: int = 0,
        shuffle: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        **kwargs: Any,
    ) -> None:
        """The evaluation loader, sharded across processes when distributed."""
        dataset = self.adapted_dataset
        if distributed.is_distributed():
            dataset = distributed.shard(dataset)
        self.dataloader = DataLoader(
            WorkerSafeDataset(dataset),
            batch_size=self.eval_mb_size,
            shuffle=shuffle,
            collate_fn=getattr(self.adapted_dataset, "collate_fn", None),
            **loader_kwargs(self.device, num_workers, pin_memory, persistent_workers),
        )
