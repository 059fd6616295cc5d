"""``lightning-peft``: the command line.

    lightning-peft fit --config examples/configs/smollm2-rt-qlora.yaml [--trainer.max_steps 10]
    lightning-peft validate --config ... --ckpt_path runs/cli/checkpoints/sentiment.ckpt
    lightning-peft export --config ... --ckpt runs/.../sentiment.ckpt --peft-dir out/
        [--merged-dir out2/]
        [--data.init_args.chat_template t.jinja ...]   (the fit command's overrides)
    lightning-peft memory 70B --gpu 48
    lightning-peft serve --adapter sentiment=runs/demo/checkpoints/sentiment-peft --precision nf4

``fit``, ``validate``, ``test`` and ``predict`` are Lightning's ``LightningCLI`` with this
package's ``Trainer`` (so ``--trainer.precision nf4-lora`` works); the adapter method,
precision mode, optimizer and checkpointing come from the YAML or from flags, and
``--help`` documents them all. ``export`` rebuilds the model from the same YAML (and the
same ``--model.*`` / ``--data.*`` / ``--trainer.*`` overrides as the fit), attaches
the checkpoint's adapters and writes them in the PEFT format and/or merged into the base.
``memory`` prints the QLoRA paper's memory arithmetic for a model size.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI

from lightning_peft._compat import CLI_CLASS_PATH_KEY
from lightning_peft.checkpoint import (
    check_adapter_state_dict,
    check_base_fingerprint,
    read_metadata,
)
from lightning_peft.checkpoint.export import is_export_file, merge_and_export
from lightning_peft.checkpoint.io import check_folder_target, held_tokenizer
from lightning_peft.checkpoint.metadata import config_from_metadata
from lightning_peft.checkpoint.peft_format import save_peft
from lightning_peft.errors import AdapterStateError
from lightning_peft.lightning.attach import attach_adapters_once
from lightning_peft.lightning.callbacks import AdapterCheckpoint
from lightning_peft.lightning.interrupts import InterruptCheckpoint
from lightning_peft.lightning.predictions import ChatPredictionWriter
from lightning_peft.lightning.progress import ProgressLog
from lightning_peft.lightning.trainer import Trainer
from lightning_peft.quantization.estimate import METHODS, Architecture, Method, estimate_memory
from lightning_peft.quiet import quiet_known_noise
from lightning_peft.usage import OVERVIEW


class PeftCLI(LightningCLI):
    """``LightningCLI`` with ``lightning_peft.Trainer``; any LightningModule / DataModule."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            trainer_class=Trainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # The YAML given is the record of the run; do not litter the working directory
            # (with logger: false Lightning would write config.yaml there).
            save_config_callback=None,
            args=list(args) if args is not None else None,
            run=run,
        )

    def before_fit(self) -> None:
        """Unless the config has them: an :class:`InterruptCheckpoint` beside the config's
        ``AdapterCheckpoint`` (else under the run's root folder), so Ctrl-C and preemption
        leave a checkpoint to resume from; and, when the output is not a terminal, a
        :class:`ProgressLog` line every ``log_every_n_steps``."""
        callbacks = cast(Any, self.trainer).callbacks
        if not sys.stdout.isatty() and not any(isinstance(c, ProgressLog) for c in callbacks):
            # Output to a file: a progress bar shows nothing there until the end.
            every = cast(Any, self.trainer).log_every_n_steps  # set by Lightning, not declared
            callbacks.append(ProgressLog(every_n_steps=every))
        if any(isinstance(c, InterruptCheckpoint) for c in callbacks):
            return
        saver = next((c for c in callbacks if isinstance(c, AdapterCheckpoint)), None)
        folder = saver.dirpath if saver is not None and saver.dirpath else None
        callbacks.append(
            InterruptCheckpoint(str(folder or Path(self.trainer.default_root_dir) / "checkpoints"))
        )

    def before_predict(self) -> None:
        """A chat data module's predictions go to a JSON Lines file beside its prompts,
        unless the config has a prediction writer of its own."""
        callbacks = cast(Any, self.trainer).callbacks
        if getattr(self.datamodule, "predict_rows", None) and not any(
            isinstance(c, BasePredictionWriter) for c in callbacks
        ):
            callbacks.append(ChatPredictionWriter())

    def _parse_ckpt_path(self) -> None:
        # LightningCLI 2.6 reads the model's hyperparameters back from --ckpt_path. A module
        # saved outside the CLI (the demo's) records no class path, and in subclass mode that
        # parse fails ("Option 'lr' is not accepted"): there the config names the model.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get(
                "hyper_parameters", {}
            )
            if hparams and CLI_CLASS_PATH_KEY not in hparams:
                return
        super()._parse_ckpt_path()


def main(argv: Sequence[str] | None = None) -> None:
    quiet_known_noise()
    given = list(sys.argv[1:] if argv is None else argv)
    if given and given[0] == "export":
        export(given[1:])
    elif given and given[0] == "memory":
        memory(given[1:])
    elif given and given[0] == "serve":  # the server is not Lightning's: the console script's
        sys.exit(
            "serve runs from the console script: lightning-peft serve ... (or python -m "
            "lightning_peft.command serve ...)"
        )
    else:
        if not given or given[0] in ("-h", "--help"):
            print(OVERVIEW)
        # From the console script LightningCLI reads sys.argv itself: passing it as args too
        # makes it warn that it got both.
        PeftCLI(args=None if argv is None else given)


def export(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-peft export",
        description="Write a checkpoint's adapters in the Hugging Face PEFT format and/or "
        "merged into a standalone transformers model.",
    )
    parser.add_argument("--config", required=True, help="the YAML the adapters were trained with")
    parser.add_argument("--ckpt", required=True, help="an adapter checkpoint (.ckpt)")
    parser.add_argument(
        "--peft-dir", help="write adapter_config.json + adapter_model.safetensors here"
    )
    parser.add_argument(
        "--merged-dir", help="write the merged model (save_pretrained) here: a new or empty folder"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let --merged-dir hold other files: only the export's own files are replaced",
    )
    parser.add_argument("--base-model-name-or-path", help="recorded in adapter_config.json")
    args, overrides = parser.parse_known_args(argv)
    if any(
        not o.startswith(("--model.", "--data.", "--trainer.")) for o in overrides if o[:2] == "--"
    ):
        parser.error(
            f"unrecognized arguments: {' '.join(overrides)} (besides its own options, export "
            "takes the fit command's --model.*, --data.* and --trainer.* overrides)"
        )
    if not (args.peft_dir or args.merged_dir):
        parser.error("give --peft-dir, --merged-dir or both")
    try:
        if args.merged_dir:  # before the (slow) load: a refused target costs nothing
            check_folder_target(args.merged_dir, is_export_file, overwrite=args.overwrite)
        module, tokenizer = load_for_export(args.config, args.ckpt, overrides)
        if args.peft_dir:
            names = sorted({a["name"] for a in read_metadata(_load(args.ckpt))["adapters"]})
            save_peft(
                module,
                args.peft_dir,
                args.base_model_name_or_path,
                adapter_name=names[0],
                tokenizer=tokenizer,
            )
            print(f"PEFT adapter written to {args.peft_dir}")
        if args.merged_dir:
            merge_and_export(module, args.merged_dir, overwrite=args.overwrite, tokenizer=tokenizer)
            print(f"merged model written to {args.merged_dir}")
    except (OSError, ValueError, KeyError, TypeError, ImportError) as error:
        sys.exit(f"lightning-peft export: {error}")


def load_for_export(config: str, ckpt: str, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """``(module, tokenizer)``: :func:`load_adapter_checkpoint` of the config with the fit
    command's overrides, and :func:`config_tokenizer` (None when there is none)."""
    cli = PeftCLI(args=["--config", config, *overrides], run=False)
    module, tokenizer = load_adapter_checkpoint(config, ckpt, cli), config_tokenizer(cli)
    trained_with = read_metadata(_load(ckpt), ckpt).get("chat_template")
    told = any("chat_template" in override for override in overrides)
    if tokenizer is not None and isinstance(trained_with, str) and not told:
        # The template the run trained with, not the tokenizer's default: the YAML may have
        # set it by a flag that is not repeated here.
        tokenizer.chat_template = trained_with
    return module, tokenizer


def config_tokenizer(cli: PeftCLI) -> Any:
    """The tokenizer the config's module or data module holds (as ``tokenizer``), which
    travels with the export; None when neither has one. The data module's comes first: it
    is the one the run trained with (``ChatData`` may replace the chat template)."""
    return held_tokenizer(cli.datamodule, cli.model)


def load_adapter_checkpoint(config: str, ckpt: str, cli: PeftCLI | None = None) -> Any:
    """The LightningModule of ``config`` with the adapters of ``ckpt`` attached and loaded
    (its base quantized first when the config trains under ``PeftPrecision``); ``cli``: the
    config already parsed."""
    cli = cli or PeftCLI(args=["--config", config], run=False)
    checkpoint = _load(ckpt)
    metadata = read_metadata(checkpoint, ckpt)
    configs = [config_from_metadata(entry) for entry in metadata["adapters"]]
    names = {entry["name"] for entry in metadata["adapters"]}
    if len(names) != 1:
        raise AdapterStateError(f"{ckpt} holds adapters named {sorted(names)}; export takes one")
    module = cli.model
    # The metadata lists every config the run trained, a task head's Unfreeze among them.
    attach_adapters_once(
        cli.trainer, module, lambda plugin: configs, name=names.pop(), train_head=False
    )
    state = checkpoint["state_dict"]
    check_adapter_state_dict(module, state)
    check_base_fingerprint(metadata, module, ckpt)
    module.load_state_dict(state, strict=False)
    return module


def _load(ckpt: str) -> dict[str, Any]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def memory(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-peft memory",
        description="Memory to fine-tune a model of a given size (QLoRA paper's arithmetic); "
        "with --config, the activations of a training step too.",
    )
    parser.add_argument("size", help="parameters, e.g. 70B, 7b, 135M or 134515008")
    parser.add_argument("--method", choices=[*METHODS, "all"], default="all")
    parser.add_argument("--gpu", type=float, help="GPU memory in GB: say whether it fits")
    parser.add_argument("--adapter-fraction", type=float, default=0.012)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "sgd"])
    parser.add_argument(
        "--config",
        help="the model: a folder holding its config.json, or 'smollm2'; adds activations",
    )
    parser.add_argument("--batch", type=int, default=8, help="rows a step (with --config)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens a row (with --config)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compute", choices=["bf16", "fp32"], default="bf16", help="fp32 on a CPU")
    args = parser.parse_args(argv)
    if args.gpu is not None and not (math.isfinite(args.gpu) and args.gpu > 0):
        parser.error(f"--gpu must be a positive number of GB, got {args.gpu}")
    architecture = None
    if args.config is not None:
        try:
            architecture = Architecture.from_config(_model_config(args.config))
        except (OSError, ValueError) as error:
            parser.error(f"--config {args.config}: {error}")
    methods: Sequence[Method] = METHODS if args.method == "all" else [args.method]
    try:  # every check before the first table
        estimates = [
            estimate_memory(
                args.size,
                m,
                adapter_fraction=args.adapter_fraction,
                optimizer=args.optimizer,
                architecture=architecture,
                batch=args.batch,
                seq_len=args.seq_len,
                gradient_checkpointing=args.gradient_checkpointing,
                compute_bytes=2 if args.compute == "bf16" else 4,
            )
            for m in methods
        ]
    except ValueError as error:
        parser.error(str(error))
    for estimate in estimates:
        print(estimate.table(gpu_gb=args.gpu) + "\n")


def _model_config(name_or_folder: str) -> dict[str, Any]:
    """The ``config.json`` of a model folder, or of the built-in ``smollm2``."""
    import json

    if name_or_folder == "smollm2":
        from lightning_peft.data import smollm2_path

        name_or_folder = str(smollm2_path())
    config = Path(name_or_folder) / "config.json"
    if not config.is_file():
        raise OSError("no config.json there (give a folder a model was saved to, or 'smollm2')")
    return dict(json.loads(config.read_text()))


if __name__ == "__main__":
    main()
