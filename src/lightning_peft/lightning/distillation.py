"""``Distillation``: train a student on its labels and on a teacher's distribution, from a
callback, with the module's ``training_step`` unchanged."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_peft.adapters.inputs import find_transformers_model
from lightning_peft.checkpoint.io import held_tokenizer
from lightning_peft.checkpoint.metadata import fingerprint_frozen
from lightning_peft.distillation import is_temperature, kd_loss
from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.lightning.module_state import state_of
from lightning_peft.quantization import QUANT_MODES, QuantMode
from lightning_peft.switching import disable_adapters

SELF = "base"  # Distillation(teacher="base"): the student's own base, adapters off


class Distillation(Callback):
    """Make each training loss ``alpha * kd + (1 - alpha) * loss``, ``kd`` being
    :func:`~lightning_peft.distillation.kd_loss` between the student's logits and the teacher's
    on the same inputs.

    The module stays as it is: its ``training_step`` returns its model's loss on the labels.
    The callback watches the transformers model inside the module (the student); when it runs
    during a training step, the teacher runs on the same inputs without gradients. Validation,
    test and predict see the student alone.

    Args:
        teacher: a frozen transformers model with the student's vocabulary (or label count),
            or ``"base"``: the student's own base model with its adapters off (self-
            distillation, a guard against forgetting, without a second copy of the weights;
            needs adapters, e.g. ``PeftCallback`` alongside).
        temperature: ``T`` of the softened distributions.
        alpha: weight of the distillation term; ``None`` leaves the loss as the module
            returns it (a module that combines its own reads :attr:`teacher_logits`).
        quantize: ``"nf4"`` (or ``"fp4"``, ``"int8"``) stores the teacher's linear layers in
            that format, to save memory.
        teacher_tokenizer: the teacher's tokenizer; with the data module's or module's
            ``tokenizer``, checked at setup to map tokens to the same ids (a vocabulary of
            the same size may be another one).

    The teacher is put in eval mode and frozen, moved to the student's device (on every rank
    under DDP), never given to the optimizer and never saved: checkpoints hold its
    fingerprint, and resuming with another teacher is refused. For language models the loss
    is averaged over the positions the batch's ``attention_mask`` keeps. If the student
    runs more than once in a training step, the terms of its runs add up (and
    :attr:`teacher_logits` holds the last run's).

    Raises:
        AdapterConfigError: a bad argument, or (at setup, before training) a teacher whose
            vocabulary or label count differs from the student's.
    """

    def __init__(
        self,
        teacher: nn.Module | str,
        temperature: float = 2.0,
        alpha: float | None = 0.5,
        quantize: QuantMode | None = None,
        teacher_tokenizer: Any = None,
    ) -> None:
        problems = []
        if isinstance(teacher, str) and teacher != SELF:
            problems.append(f"teacher must be a model or {SELF!r}, got {teacher!r}")
        elif not isinstance(teacher, (nn.Module, str)):
            problems.append(f"teacher must be a model or {SELF!r}, got {type(teacher).__name__}")
        if not is_temperature(temperature):
            problems.append(f"temperature must be a positive finite number, got {temperature!r}")
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1
        ):
            problems.append(f"alpha must be in [0, 1] or None, got {alpha!r}")
        if quantize is not None and quantize not in QUANT_MODES:
            problems.append(f"quantize must be None or one of {QUANT_MODES}, got {quantize!r}")
        if quantize is not None and teacher == SELF:
            problems.append("quantize applies to a separate teacher, not to teacher='base'")
        if isinstance(teacher, nn.Module) and any(
            t.is_meta for t in [*teacher.parameters(), *teacher.buffers()]
        ):
            problems.append(
                f"the teacher {type(teacher).__name__} has weights on the meta device (made "
                "without data, e.g. under init_empty_weights or device_map='meta'): load its "
                "weights first, e.g. from_pretrained(path) on the CPU"
            )
        if teacher_tokenizer is not None and not callable(
            getattr(teacher_tokenizer, "get_vocab", None)
        ):
            problems.append(f"teacher_tokenizer must be a tokenizer, got {teacher_tokenizer!r}")
        if problems:
            raise AdapterConfigError("invalid Distillation:\n  - " + "\n  - ".join(problems))
        self.teacher = teacher
        self.temperature, self.alpha, self.quantize = temperature, alpha, quantize
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_logits: torch.Tensor | None = None
        self.last_kd: torch.Tensor | None = None
        self._armed = False
        self._in_teacher = False
        self._hooks: list[Any] = []
        self._module: pl.LightningModule | None = None
        self._inputs: tuple[tuple, dict[str, Any]] | None = None
        self._fingerprint: str | None = None
        self._restored_fingerprint: str | None = None

    @property
    def is_self_distillation(self) -> bool:
        return isinstance(self.teacher, str)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._release()  # a fit that raised skipped teardown: hook this run's module afresh
        student = find_transformers_model(pl_module, "Distillation")
        if not pl_module.automatic_optimization and self.alpha is not None:
            raise AdapterConfigError(
                f"{type(pl_module).__name__} optimizes manually (its training_step calls "
                "backward itself), so Distillation cannot add to the loss it returns: pass "
                "alpha=None and add kd_loss(logits, callback.teacher_logits) in training_step"
            )
        if not self.is_self_distillation:
            teacher = cast(nn.Module, self.teacher)
            if any(teacher is m for m in pl_module.modules()):
                raise AdapterConfigError(
                    "the teacher is a submodule of the LightningModule: it would be trained and "
                    "saved; keep it outside the module (or use teacher='base')"
                )
            _check_same_outputs(student, teacher)
            self._check_same_tokenizer(trainer, pl_module)
            teacher.requires_grad_(False).eval()
        # The inputs as the module passed them, before other pre-hooks (a soft prompt's)
        # rewrite them: the teacher gets the same ones.
        self._hooks = [
            student.register_forward_pre_hook(self._before_student, with_kwargs=True, prepend=True),
            student.register_forward_hook(self._after_student, with_kwargs=True),
        ]
        self._wrap_training_step(pl_module)
        self._module = pl_module

    def _check_same_tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Same vocabulary size is not the same vocabulary: where both tokenizers are known
        (``teacher_tokenizer``, and the data module's or module's ``tokenizer``), their
        token-to-id maps must be equal."""
        student = held_tokenizer(cast(Any, trainer).datamodule, pl_module, needs="get_vocab")
        if self.teacher_tokenizer is None or student is None:
            return
        ours, theirs = student.get_vocab(), self.teacher_tokenizer.get_vocab()
        if ours != theirs:
            differ = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))
            token = differ[0]
            raise AdapterConfigError(
                f"the teacher's tokenizer maps tokens to other ids than the student's "
                f"({len(differ)} tokens differ, e.g. {token!r}: {ours.get(token)} for the "
                f"student, {theirs.get(token)} for the teacher): its logits would be compared "
                "for other tokens. Distill from a teacher of the same "
                "tokenizer"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()  # Lightning skips teardown when fit raises

    def _release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)  # the class's own again
            self._module = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here the strategy has put the student on its device, and every callback's setup
        # (PeftCallback's adapters included) has run.
        if self.is_self_distillation:
            if not adapter_parameter_names(pl_module):
                raise AdapterConfigError(
                    "teacher='base' distills from the student's base with its adapters off, "
                    "and the module has no adapters: add PeftCallback(...) (or use PeftMixin)"
                )
            with disable_adapters(pl_module):  # raises now for BitFit / Unfreeze, not mid-run
                pass
            return
        teacher = cast(nn.Module, self.teacher)  # a model: not self-distillation
        if self.quantize is not None and not state_of(teacher).quantized:
            from lightning_peft.quantization import quantize_model

            quantize_model(teacher, self.quantize, device=pl_module.device)
            state_of(teacher).quantized = True
        teacher.to(pl_module.device)
        self._fingerprint = fingerprint_frozen(teacher)
        restored = self._restored_fingerprint
        if restored is not None and restored != self._fingerprint:
            raise AdapterStateError(
                "the checkpoint was trained with another teacher (its fingerprint differs); "
                "resume with the teacher the run started with"
            )

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        # The instance attribute wins over the class's method; Lightning (and its DDP
        # wrapper) look training_step up on the instance.
        original = type(pl_module).training_step.__get__(pl_module)

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._armed, self.teacher_logits, self.last_kd = True, None, None
            try:
                output = original(*args, **kwargs)
            finally:
                self._armed = False
            if self.alpha is None or output is None:
                return output
            if self.last_kd is None:
                raise AdapterStateError(
                    "Distillation: the student model did not run inside training_step, so "
                    "there is no student output to distill into"
                )
            loss = output["loss"] if isinstance(output, dict) else output
            combined = self.alpha * self.last_kd + (1 - self.alpha) * loss
            pl_module.log("kd_loss", self.last_kd.detach(), prog_bar=False)
            return {**output, "loss": combined} if isinstance(output, dict) else combined

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def _before_student(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._armed and not self._in_teacher:
            self._inputs = (args, dict(kwargs))

    def _after_student(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self._armed or self._in_teacher or self._inputs is None:
            return
        logits = output_logits(output)
        args, kwargs = self._inputs
        self._inputs = None
        inputs = teacher_inputs(module, kwargs)
        self._in_teacher = True
        try:
            with torch.no_grad():
                if self.is_self_distillation:
                    # the base as the student's teacher: adapters off, dropout off
                    with disable_adapters(module), modes_kept(module):
                        teacher_output = module.eval()(*args, **inputs)
                else:
                    teacher_output = cast(nn.Module, self.teacher)(*args, **inputs)
        finally:
            self._in_teacher = False
        teacher_logits = output_logits(teacher_output)
        mask = token_mask(kwargs, logits)
        self.teacher_logits = teacher_logits
        try:
            kd = kd_loss(logits, teacher_logits, self.temperature, mask)
        except FloatingPointError as error:
            name = (
                "the student's base" if self.is_self_distillation else type(self.teacher).__name__
            )
            step = self._module.trainer.global_step if self._module is not None else "?"
            raise AdapterStateError(
                f"Distillation at step {step}: teacher {name}: {error}"
            ) from error
        self.last_kd = kd if self.last_kd is None else self.last_kd + kd

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"teacher_fingerprint": self._fingerprint}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_fingerprint = state_dict.get("teacher_fingerprint")


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a transformers model's output (a ``ModelOutput`` or, with
    ``return_dict=False``, a tuple whose first item they are)."""
    logits = getattr(output, "logits", None)
    return output[0] if logits is None else logits


def teacher_inputs(student: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The student's keyword inputs for the teacher: without ``labels`` (the teacher's loss
    is not needed), but with the decoder inputs an encoder-decoder builds from them."""
    inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "return_dict")}
    labels = kwargs.get("labels")
    shift = getattr(student, "prepare_decoder_input_ids_from_labels", None)
    config = getattr(student, "config", None)
    if (
        labels is not None
        and getattr(config, "is_encoder_decoder", False)
        and inputs.get("decoder_input_ids") is None
        and inputs.get("decoder_inputs_embeds") is None
        and callable(shift)
    ):
        inputs["decoder_input_ids"] = shift(labels=labels)
    return inputs


def token_mask(kwargs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
    """The positions kd averages over: the decoder's (its attention mask, else its labels
    that are not -100) for an encoder-decoder, the attention mask for a decoder; None for
    classifiers or when no mask fits the logits."""
    if logits.dim() != 3:
        return None
    for key in ("decoder_attention_mask", "attention_mask"):
        mask = kwargs.get(key)
        if mask is not None and mask.shape == logits.shape[:-1]:
            return mask
    labels = kwargs.get("labels")
    if labels is not None and labels.shape == logits.shape[:-1]:
        return labels != -100
    return None


@contextlib.contextmanager
def modes_kept(module: nn.Module) -> Iterator[None]:
    """Every submodule's train/eval mode as it was when the block ends."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_same_outputs(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a teacher whose vocabulary or label count differs from the student's."""
    for field in ("vocab_size", "num_labels"):
        ours = getattr(getattr(student, "config", None), field, None)
        theirs = getattr(getattr(teacher, "config", None), field, None)
        if ours is not None and theirs is not None and ours != theirs:
            raise AdapterConfigError(
                f"teacher {type(teacher).__name__} has {field}={theirs}, the student "
                f"{type(student).__name__} {field}={ours}: distillation compares their output "
                "distributions, which need the same classes"
            )
