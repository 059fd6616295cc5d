"""``PeftPrecision``: the QLoRA recipe as a Lightning precision plugin.

The frozen base is stored in NF4 (or FP4 / LLM.int8) through bitsandbytes, adapters train
in 32 or 16 bit, and the optimizer the module configured can be swapped for a paged or
8-bit bitsandbytes one. Lightning's own ``BitsandbytesPrecision`` refuses the CPU and
quantizes every ``nn.Linear`` it finds, the adapters' included; this plugin quantizes
before adapters are attached and leaves them (and the output head) alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_peft._compat import attached_trainer
from lightning_peft.adapters import LoRA, MethodConfig
from lightning_peft.errors import AdapterConfigError
from lightning_peft.injection import (
    adapter_parameter_names,
    apply_adapters,
    as_config_list,
    is_adapter_config,
)
from lightning_peft.lightning.checkpoint_io import make_checkpoints_adapter_only
from lightning_peft.lightning.module_state import state_of
from lightning_peft.quantization import (
    OPTIMIZER_NAMES,
    OptimizerName,
    QuantMode,
    keep_norms_in_float32_,
    optimizer_class,
    quantize_model,
    rebind_schedulers,
    rebuild_optimizer,
    why_not_rebuilt,
)

PeftMode = Literal["nf4-lora", "nf4-lora-nodq", "fp4-lora", "int8-lora"]
Compute = Literal["32-true", "bf16-mixed", "16-mixed"]
MODES: tuple[PeftMode, ...] = get_args(PeftMode)
COMPUTES: tuple[Compute, ...] = get_args(Compute)
# mode -> (bitsandbytes quantization, double quantization of the constants)
_QUANTIZATION: dict[str, tuple[QuantMode, bool]] = {
    "nf4-lora": ("nf4", True),
    "nf4-lora-nodq": ("nf4", False),
    "fp4-lora": ("fp4", True),
    "int8-lora": ("int8", False),
}
_COMPUTE_DTYPE = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def default_optimizer(mode: str, device: str) -> OptimizerName | None:
    """The optimizer a mode trains with unless told otherwise: QLoRA's paged 8-bit AdamW for
    the 4-bit modes (unpaged on the CPU, where paging does not exist), the module's own for
    the int8 mode."""
    if _QUANTIZATION[mode][0] == "int8":
        return None
    return "paged_adamw_8bit" if device == "cuda" else "adamw_8bit"


def default_adapters() -> LoRA:
    """The adapters a mode attaches when nothing else says: LoRA rank 8 on all linear layers."""
    return LoRA(rank=8, alpha=16, target_modules="all-linear")


class PeftPrecision(Precision):
    """Quantized frozen base + adapters + (optionally) a bitsandbytes optimizer.

    Args:
        mode: ``"nf4-lora"`` (QLoRA: NF4 with double quantization), ``"nf4-lora-nodq"``,
            ``"fp4-lora"`` or ``"int8-lora"`` (LLM.int8 base).
        compute: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"``: the autocast of the
            forward pass and the compute dtype of the 4-bit matmuls.
        adapters: attached when no ``PeftCallback`` / ``PeftMixin`` brings its own
            (default: LoRA rank 8 on every linear layer but the output head).
        skip_modules: module-name suffixes kept in float besides the output head (one
            suffix as a string, or a list).
        blocksize: weights per quantization constant (QLoRA: 64).
        quant_storage: storage dtype of the packed 4-bit codes (``torch.float32`` for FSDP1;
            FSDP2 shards ``uint8``).
        optimizer: rebuild the Adam or AdamW ``configure_optimizers`` returns as
            ``"paged_adamw_8bit"``, ``"paged_adamw_32bit"``, ``"adamw_8bit"`` or ``"adamw"``,
            keeping every key of its parameter groups and every LR scheduler bound to it
            (chained and sequential ones included); any other optimizer (SGD, Adam with
            L2 weight decay, AMSGrad, one over FSDP2's sharded parameters) is kept, with one
            info line saying why. ``None`` keeps it as configured. ``"auto"`` (the
            default) is the QLoRA recipe for the 4-bit modes: paged 8-bit AdamW on CUDA,
            8-bit AdamW on the CPU (where bitsandbytes has no paging); the int8 mode keeps
            the module's optimizer.
        optimizer_kwargs: passed to the new optimizer (e.g. ``min_8bit_size``).
        device: ``"cpu"`` or ``"cuda"`` for autocast (default: CUDA when present).
        gradient_checkpointing: recompute layer activations in the backward pass (applied
            by the ``PeftCallback`` that ``lightning_peft.Trainer`` adds; see there).

    Under the 4-bit modes, norm layers stored in 16 bit are kept in float32
    (:func:`~lightning_peft.quantization.keep_norms_in_float32_`), as PEFT's
    ``prepare_model_for_kbit_training`` does.

    For resuming from adapter checkpoints the adapters must exist before Lightning restores
    the model: use it with ``PeftCallback`` or ``PeftMixin``, or through
    ``lightning_peft.Trainer(precision="nf4-lora")``, which adds the callback.
    """

    def __init__(
        self,
        mode: PeftMode = "nf4-lora",
        compute: Compute = "32-true",
        *,
        adapters: MethodConfig | Sequence[MethodConfig] | None = None,
        skip_modules: Sequence[str] = (),
        blocksize: int = 64,
        quant_storage: torch.dtype = torch.uint8,
        optimizer: OptimizerName | Literal["auto"] | None = "auto",
        optimizer_kwargs: dict[str, Any] | None = None,
        device: Literal["cpu", "cuda"] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        problems = []
        if mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {mode!r}")
        if compute not in COMPUTES:
            problems.append(f"compute must be one of {COMPUTES}, got {compute!r}")
        if optimizer not in (None, "auto", *OPTIMIZER_NAMES):
            problems.append(
                f"optimizer must be None, 'auto' or one of {OPTIMIZER_NAMES}, got {optimizer!r}"
            )
        if (
            isinstance(blocksize, bool)
            or not isinstance(blocksize, int)
            or blocksize not in (64, 128, 256, 512, 1024, 2048, 4096)
        ):
            problems.append(f"blocksize must be a power of two from 64 to 4096, got {blocksize!r}")
        configs = adapters if isinstance(adapters, (list, tuple)) else [adapters]
        if adapters is not None and not (configs and all(map(is_adapter_config, configs))):
            problems.append(
                f"adapters must be an adapter config such as LoRA(...) or a list of them, got "
                f"{adapters!r}"
            )
        if problems:
            raise AdapterConfigError("invalid PeftPrecision:\n  - " + "\n  - ".join(problems))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__()
        # Autocast (and 16-mixed's gradient scaler) are Lightning's own MixedPrecision, which
        # this plugin hands those steps to; "32-true" runs without one.
        self.mixed = None if compute == "32-true" else MixedPrecision(compute, device)
        self.precision, self.device = compute, device  # trainer.precision reports it
        self.mode, self.compute = mode, compute
        self.adapters = adapters
        # One name given as a string is one name, not its characters.
        self.skip_modules = (
            (skip_modules,) if isinstance(skip_modules, str) else tuple(skip_modules)
        )
        self.blocksize, self.quant_storage = blocksize, quant_storage
        if optimizer == "auto":
            optimizer = default_optimizer(mode, device)
        self.optimizer, self.optimizer_kwargs = optimizer, dict(optimizer_kwargs or {})
        self.gradient_checkpointing = gradient_checkpointing

    def quantize_base(
        self,
        module: nn.Module,
        device: torch.device | None = None,
        adapters: Sequence[Any] = (),
        name: str = "default",
        train_head: bool = True,
    ) -> None:
        """Quantize ``module``'s linear layers for this mode, once, then attach ``adapters``
        (in one step, which ``LoRA(init="loftq")`` needs: it reads the float weights)."""
        if state_of(module).quantized:
            if adapters:
                apply_adapters(module, list(adapters), name=name, train_head=train_head)
            return
        quant, double_quant = _QUANTIZATION[self.mode]
        quantize_model(
            module,
            quant,
            skip_modules=self.skip_modules,
            compute_dtype=_COMPUTE_DTYPE[self.compute],
            double_quant=double_quant,
            blocksize=self.blocksize,
            quant_storage=self.quant_storage,
            device=device,
            adapters=list(adapters) or None,
            adapter_name=name,
            train_head=train_head,
        )
        if quant != "int8":
            keep_norms_in_float32_(module)
        state_of(module).quantized = True

    @property
    def flag(self) -> str:
        """The ``precision=`` flag that sets up this plugin: ``"nf4-lora-bf16-mixed"``."""
        return self.mode if self.compute == "32-true" else f"{self.mode}-{self.compute}"

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        # PeftCallback / PeftMixin have done both steps already, before checkpoint restore;
        # alone, the plugin does them here (fine for training, too late for resuming).
        trainer = attached_trainer(module)
        device = trainer.strategy.root_device if trainer is not None else None
        missing = not adapter_parameter_names(module)
        adapters = self.adapters or default_adapters()
        self.quantize_base(module, device, as_config_list(adapters) if missing else ())
        if trainer is not None:
            make_checkpoints_adapter_only(trainer)  # its checkpoints hold the adapters only
        return module

    @override
    def forward_context(self) -> Any:
        if self.mixed is None:
            return contextlib.nullcontext()
        return self.mixed.forward_context()

    # The signatures are Lightning's Precision's own (which overrides Fabric's the same way).
    @override
    def pre_backward(  # type: ignore[override]
        self, tensor: torch.Tensor, module: pl.LightningModule
    ) -> torch.Tensor:
        if self.mixed is None:
            return super().pre_backward(tensor, module)
        return self.mixed.pre_backward(tensor, module)

    @override
    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if self.mixed is None:
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        return self.mixed.optimizer_step(optimizer, model, closure, **kwargs)

    @override
    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if self.mixed is None:
            super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        else:  # refuses optimizers that unscale gradients themselves
            self.mixed.clip_gradients(optimizer, clip_val, gradient_clip_algorithm)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self.mixed is None else self.mixed.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.mixed is not None:
            self.mixed.load_state_dict(state_dict)

    @override
    def connect(
        self, model: nn.Module, optimizers: list, lr_schedulers: list
    ) -> tuple[nn.Module, list, list]:
        if self.optimizer is None:
            return model, optimizers, lr_schedulers
        rebuilt = []
        for optimizer in optimizers:
            reason = why_not_rebuilt(optimizer)
            if type(optimizer) is optimizer_class(self.optimizer) or reason is not None:
                # Lightning connects again at every validate/test after fit: keep its state.
                if reason is not None and not getattr(optimizer, _KEPT_SAID, False):
                    setattr(optimizer, _KEPT_SAID, True)
                    rank_zero_info(
                        f"PeftPrecision keeps the module's {type(optimizer).__name__} as it is "
                        f"(not {self.optimizer}): {reason}."
                    )
                rebuilt.append(optimizer)
                continue
            new = rebuild_optimizer(optimizer, self.optimizer, **self.optimizer_kwargs)
            for config in lr_schedulers:
                rebind_schedulers(config.scheduler, optimizer, new)
            rebuilt.append(new)
        return model, rebuilt, lr_schedulers


# Set on an optimizer the plugin kept, so that its info line is said once, not at every connect.
_KEPT_SAID = "_lightning_peft_kept_said"


def split_precision_flag(value: str) -> tuple[PeftMode, Compute] | None:
    """``"nf4-lora-bf16-mixed"`` -> ``("nf4-lora", "bf16-mixed")``; None for Lightning's own flags.

    Raises:
        AdapterConfigError: a flag that looks like a mode (nf4..., ...lora...) but is none.
    """
    for mode in sorted(MODES, key=len, reverse=True):
        if value == mode:
            return mode, "32-true"
        for compute in COMPUTES:
            if value == f"{mode}-{compute}":
                return mode, compute
    if "lora" in value or value.startswith(("nf4", "fp4", "int8")):
        raise AdapterConfigError(
            f"precision={value!r} is not a lightning_peft mode; valid modes: {', '.join(MODES)}, "
            "each optionally with a compute suffix: -bf16-mixed, -16-mixed (e.g. "
            "'nf4-lora-bf16-mixed')"
        )
    return None


def peft_precision(trainer: pl.Trainer | None) -> PeftPrecision | None:
    """The trainer's :class:`PeftPrecision`, or None when it runs another precision."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    return plugin if isinstance(plugin, PeftPrecision) else None
