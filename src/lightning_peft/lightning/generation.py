"""``GenerationSamples``: see what the model says, at every validation, from fixed prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_peft._compat import batches_that_stepped
from lightning_peft.adapters.inputs import find_transformers_model
from lightning_peft.checkpoint.io import held_tokenizer
from lightning_peft.errors import AdapterConfigError

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


class GenerationSamples(Callback):
    """Generate from a few fixed prompts after each validation and log the completions.

    Greedy by default, with the adapters active, in eval mode and without gradients; the
    random state is left as it was (sampling included), so a run with this callback resumes
    exactly like one without. Completions go to every logger with a text API (Weights &
    Biases' ``log_text``, TensorBoard's ``add_text``), else to the console; ``samples`` holds
    the last ones.

    Args:
        prompts: strings, chat conversations (``[{"role": "user", "content": ...}]``, given
            to the tokenizer's chat template) or token-id lists (no tokenizer needed).
        tokenizer: a transformers tokenizer; default: the DataModule's or LightningModule's
            ``tokenizer`` attribute.
        max_new_tokens: tokens generated per prompt.
        generate_kwargs: passed to ``generate`` (``do_sample=True``, ``temperature``, ...).

    Raises:
        AdapterConfigError: no prompt, or ``max_new_tokens`` not a positive int.
    """

    def __init__(
        self,
        prompts: Sequence[Prompt],
        *,
        tokenizer: Any = None,
        max_new_tokens: int = 32,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(prompts, str) or not prompts:
            raise AdapterConfigError(f"GenerationSamples needs a list of prompts, got {prompts!r}")
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or (max_new_tokens <= 0)
        ):
            raise AdapterConfigError(
                f"max_new_tokens must be a positive int, got {max_new_tokens!r}"
            )
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}
        self.samples: list[dict[str, Any]] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check before training what the first validation would find: text prompts need a
        tokenizer (an epoch in is too late to say so)."""
        text = [p for p in self.prompts if not _is_token_ids(p)]
        if text and self._tokenizer(trainer) is None:
            raise AdapterConfigError(
                f"GenerationSamples got text prompts ({str(text[0])[:40]!r}) but finds no "
                "tokenizer: pass tokenizer=..., give the module or data module a tokenizer "
                "attribute, or give token ids"
            )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        host = find_transformers_model(pl_module, "GenerationSamples")
        tokenizer = self._tokenizer(trainer)
        was_training = host.training
        host.eval()
        # Sampling draws from the RNG: fork it, so training goes on as without this callback.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            self.samples = [
                self._complete(host, tokenizer, prompt, logged_step(trainer))
                for prompt in self.prompts
            ]
        host.train(was_training)
        self._log(trainer)

    def _tokenizer(self, trainer: pl.Trainer) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        # the data module's first, as AdapterCheckpoint chooses
        datamodule = cast(Any, trainer).datamodule  # set by Lightning, not declared
        return held_tokenizer(datamodule, trainer.lightning_module, needs="decode")

    def _complete(self, host: Any, tokenizer: Any, prompt: Prompt, step: int) -> dict[str, Any]:
        device = host.get_input_embeddings().weight.device
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
            assert tokenizer is not None, "refused in setup"
            if isinstance(prompt, str):
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            else:
                ids = tokenizer.apply_chat_template(
                    list(prompt), add_generation_prompt=True, return_tensors="pt"
                )
                ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        else:
            ids = torch.tensor([list(prompt)])
        ids = ids.to(device)
        output = host.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0,
            **self.generate_kwargs,
        )
        new = output[0, ids.shape[1] :].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
        return {"step": step, "prompt": prompt, "output_ids": new, "completion": text}

    def _log(self, trainer: pl.Trainer) -> None:
        rows = [
            [
                s["step"],
                str(s["prompt"]),
                s["completion"] if s["completion"] is not None else str(s["output_ids"]),
            ]
            for s in self.samples
        ]
        logged = False
        logger: Any  # each logger's own API (W&B, TensorBoard)
        for logger in trainer.loggers:
            if callable(getattr(logger, "log_text", None)):  # Weights & Biases
                logger.log_text(key="samples", columns=["step", "prompt", "completion"], data=rows)
                logged = True
            elif callable(getattr(getattr(logger, "experiment", None), "add_text", None)):
                text = "\n\n".join(f"**{p}**\n\n{c}" for _, p, c in rows)  # TensorBoard
                logger.experiment.add_text("samples", text, global_step=logged_step(trainer))
                logged = True
            elif isinstance(getattr(logger, "log_dir", None), str):  # CSV: a file beside it
                path = Path(logger.log_dir) / "samples.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as file:
                    for step, prompt, completion in rows:
                        line = {"step": step, "prompt": prompt, "completion": completion}
                        file.write(json.dumps(line, ensure_ascii=False) + "\n")
        if not logged:
            # On lines of their own: a progress bar leaves its line open.
            start = "\n" if trainer.progress_bar_callback is not None else ""
            for step, prompt, completion in rows:
                print(f"{start}[step {step}] {prompt} -> {completion}")
                start = ""


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt)


def logged_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers record what is logged now under: during a validation
    inside training it is the number of batches that stepped before the current one, one
    less than ``global_step`` (Lightning's private loop counter, see _compat)."""
    return batches_that_stepped(trainer)
