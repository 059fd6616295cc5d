"""The Hugging Face PEFT file format, both ways: ``adapter_config.json`` plus
``adapter_model.safetensors`` in one directory per adapter.

This module does what every method shares: folders written whole, keys and shapes checked,
whole modules trained beside the method (PEFT's ``modules_to_save``), the task type. What
differs by method (its config fields, its tensors' names) is the method's registered
``PeftMapping`` (``adapters/peft_mapping.py``); the config names the method in
``peft_type``. Loading reads tensors with safetensors, so a file never runs code, and
tolerates config fields it does not know (PEFT adds some each release).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft.adapters.bitfit import Unfreeze
from lightning_peft.adapters.inputs import HFModel, find_transformers_model, is_encoder_decoder
from lightning_peft.adapters.peft_mapping import PROMPT, PeftMapping
from lightning_peft.adapters.registry import peft_mapping, peft_mapping_named, peft_types
from lightning_peft.checkpoint.io import owned_with_tokenizer, staged_folder
from lightning_peft.checkpoint.state import check_adapter_values
from lightning_peft.errors import AdapterConfigError, AdapterStateError, UnsupportedLayerError
from lightning_peft.injection import adapter_configs_attached, apply_adapters
from lightning_peft.protocol import TrainsWholeModules, trained_marks
from lightning_peft.quantization import QUANT_MODES, QuantMode, quantize_model
from lightning_peft.quantization.model import base_quantization
from lightning_peft.undo import restored_on_error

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Beside PEFT's two (which PEFT reads and this package adds nothing to): how the base the
# adapter trained over was stored, so loading and serving can store it the same way.
BASE_FILE = "lightning_peft.json"
_PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE, BASE_FILE)
PREFIX = "base_model.model."
_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


def save_peft(
    model: nn.Module,
    directory: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
    *,
    adapter_name: str = "default",
    tokenizer: Any = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` as Hugging Face PEFT does, so
    ``peft.PeftModel.from_pretrained(base, directory)`` loads it. With ``tokenizer`` (a
    transformers tokenizer), its files and chat template go beside the weights, so the
    folder works on its own.

    LoRA (with rsLoRA, DoRA), IA3, prompt tuning and prefix tuning have PEFT equivalents.
    Both files are written beside the folder first and moved in only when complete, so a
    failure leaves an earlier adapter there as it was; other files in the folder stay.

    Returns:
        ``directory`` as a ``Path``.

    Raises:
        AdapterStateError: no adapter of that name, or several methods under it.
        AdapterConfigError: the method has no PEFT equivalent (bottleneck adapters, BitFit).
    """
    host, _ = _host(model)
    config, mapping = _single_config(model, adapter_name)
    mapping.warn(host, config, adapter_name)
    tensors = {
        _file_key(k, mapping): v
        for k, v in _model_tensors(host, config, mapping, adapter_name).items()
    }
    mapping.saved(host, config, tensors)
    fields = {"peft_type": mapping.peft_type, **mapping.fields(host, config)}
    fields["modules_to_save"] = list(_saved_modules(host, adapter_name)) or None
    if base_model_name_or_path is None:  # as PEFT does: the model's own name or folder
        config_of_host = getattr(host, "config", None)
        base_model_name_or_path = getattr(config_of_host, "name_or_path", None) or None
    fields.update(
        base_model_name_or_path=base_model_name_or_path,
        task_type=_task_type(host),
        inference_mode=True,
    )
    from safetensors.torch import save_file

    # Both files are written in full before either replaces an earlier one; files of others
    # in the folder (a tokenizer, notes) stay as they are.
    owned = owned_with_tokenizer(_PEFT_FILES.__contains__, tokenizer)
    with staged_folder(directory, owned, overwrite=True) as staging:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
        stored = base_quantization(host)
        if stored is not None:
            record = {"base_quantization": stored}
            (staging / BASE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(directory)


class SaveAdaptersAsPeft:
    """A transformers model's ``save_pretrained`` once adapters are attached to it: writes
    the adapters as Hugging Face PEFT's ``PeftModel.save_pretrained`` does
    (``adapter_config.json`` + ``adapter_model.safetensors``; another adapter than
    ``"default"`` in a subfolder of its name), which ``AutoPeftModelForCausalLM`` and
    ``PeftModel.from_pretrained`` load on the base the config names.

    The whole adapted model is no ordinary checkpoint: its layers are wrappers, a 4-bit base
    shares lookup tables that safetensors refuses, and ``from_pretrained`` could load neither.
    For a standalone model, merge: :func:`~lightning_peft.merge_and_export`. An object, not a
    closure, so the model still pickles and a deep copy saves its own adapters.
    """

    def __init__(self, host: nn.Module, adapter_name: str = "default") -> None:
        self.host, self.adapter_name = host, adapter_name

    def __call__(
        self,
        save_directory: str | os.PathLike[str],
        *,
        is_main_process: bool = True,
        selected_adapters: Sequence[str] | None = None,
        safe_serialization: bool = True,
        **others: Any,
    ) -> None:
        refused = [f"{key}={value!r}" for key, value in others.items()]
        refused += [] if safe_serialization else ["safe_serialization=False"]
        if refused:  # silently ignoring push_to_hub or a state_dict would lose the user's intent
            raise TypeError(
                f"save_pretrained of a model with adapters writes them as PEFT files (safetensors) "
                f"and does not take {', '.join(refused)}. For a standalone model use "
                "lightning_peft.merge_and_export; for every tensor, type(model).save_pretrained"
            )
        if not is_main_process:
            return
        for name in selected_adapters or [self.adapter_name]:
            folder = Path(save_directory) / (name if name != "default" else "")
            try:
                save_peft(self.host, folder, adapter_name=name)
            except ValueError as error:
                raise type(error)(
                    f"save_pretrained writes the adapters in the PEFT format here: {error}. "
                    "For a standalone model use lightning_peft.merge_and_export; for any "
                    "method, adapter_state_dict"
                ) from error


def save_pretrained_writes_adapters_(model: nn.Module, adapter_name: str = "default") -> None:
    """Make the transformers model inside ``model`` save its adapters on ``save_pretrained``
    (see :class:`SaveAdaptersAsPeft`); nothing when ``model`` holds no transformers model."""
    try:
        host = find_transformers_model(model, "save_pretrained")
    except UnsupportedLayerError:
        return
    host.save_pretrained = SaveAdaptersAsPeft(host, adapter_name)


def check_peft_exportable(model: nn.Module, adapter_name: str = "default") -> None:
    """Raise what :func:`save_peft` would raise for ``model``, without writing anything."""
    _host(model)
    _single_config(model, adapter_name)


def load_peft(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    quantize: QuantMode | Literal["auto"] | None = "auto",
) -> nn.Module:
    """Read a PEFT adapter directory (written by :func:`save_peft` or by PEFT itself) into
    ``model`` under ``adapter_name``: attaches the adapter from its config unless the model
    already has one of that name, then copies the tensors after checking every key and shape.

    An adapter computes what it was trained to compute only on the base it was trained on:
    one trained over an NF4 base (QLoRA) needs that NF4 base. A folder written by
    :func:`save_pretrained`/:func:`save_peft` from a quantized run says so
    (``lightning_peft.json``), and ``quantize="auto"`` (the default) quantizes a float
    ``model`` the same way before attaching. ``quantize="nf4"`` (or ``"fp4"``, ``"int8"``)
    quantizes as ``quantize_model`` does, with the ``nf4-lora`` modes' defaults; ``None``
    leaves the base as it is. Choosing otherwise than the folder says is warned about: the
    adapter will answer differently.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: the directory lacks ``adapter_config.json`` or the weights.
        AdapterConfigError: a PEFT type or option this package does not implement.
        AdapterStateError: the tensors do not fit the model (missing/unexpected keys, shapes).
    """
    folder = Path(directory)
    if (
        (folder / CONFIG_FILE).is_file()
        and (folder / "adapter_model.bin").is_file()
        and not (folder / WEIGHTS_FILE).is_file()
    ):
        raise FileNotFoundError(
            f"{folder} holds adapter_model.bin, a pickle, and no {WEIGHTS_FILE}: lightning_peft "
            "reads safetensors only, since loading a pickle can run code from it. Convert it "
            "once where you trust the file (peft.PeftModel.from_pretrained, then "
            "save_pretrained(safe_serialization=True))"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: not a PEFT adapter directory")
    from safetensors.torch import load_file

    try:
        fields = json.loads((folder / CONFIG_FILE).read_text())
        config_from_peft(fields)  # every option refused before the weights are read
        tensors = load_file(str(folder / WEIGHTS_FILE))
        fields = targets_from_tensors(fields, tensors)
        check_rank_against_tensors(fields, tensors)  # before r sizes anything
        config = config_from_peft(fields)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise AdapterConfigError(f"{folder / CONFIG_FILE}: {error!s}") from error
    existing = [c for n, c in adapter_configs_attached(model) if n == adapter_name]
    if existing and _scaling_fields(existing[0]) != _scaling_fields(config):
        raise AdapterConfigError(
            f"{type(model).__name__} already has an adapter {adapter_name!r} whose "
            f"{_scaling_fields(existing[0])} differ from {folder / CONFIG_FILE}'s "
            f"{_scaling_fields(config)}: its tensors would compute something else there. Load "
            "it under another name (adapter_name=...) or delete_adapter first"
        )
    host, _ = _host(model)  # fail early on a model prompt/prefix tuning cannot use
    mapping = _mapping(config)
    submodules = fields.get("num_transformer_submodules") or 1  # prompt learning writes it
    if mapping.prompt_learning and submodules != (2 if is_encoder_decoder(host) else 1):
        raise AdapterConfigError(
            f"{folder / CONFIG_FILE} has num_transformer_submodules={submodules}, written for "
            f"an {'encoder-decoder' if submodules == 2 else 'encoder- or decoder-only'} model; "
            f"{type(host).__name__} is not one"
        )
    how = _base_storage(folder, model, quantize)
    with restored_on_error(model):  # refused below: the adapter attached here goes again
        if how is not None:
            quantize_model(model, how["mode"], **{k: v for k, v in how.items() if k != "mode"})
        if adapter_name not in _names(model):
            saved = list(fields.get("modules_to_save") or [])
            if mapping.prompt_learning:  # PEFT < 0.15 lists none
                saved += [k[len("base_model.") :].rsplit(".", 1)[0] for k in tensors if "." in k]
            heads = _modules_to_save(model, sorted(set(saved)))
            # The file says which modules trained whole; no task head beyond those.
            apply_adapters(model, [config, *heads], name=adapter_name, train_head=False)
        _copy_peft_tensors(model, folder, tensors, config, adapter_name)
    mapping.warn(host, config, adapter_name)
    return model


def targets_from_tensors(fields: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with a regular-expression ``target_modules`` replaced by the names of the
    modules the file holds tensors for (and its ``exclude_modules`` dropped).

    A folder's config is untrusted input: a pattern such as ``^([a-z_.0-9]+)+X$``
    backtracks for ever on a module name, and the weights say which modules were adapted
    anyway. Lists of names (PEFT's suffix matching) run no expression and stay.
    """
    if not isinstance(fields, dict) or not isinstance(fields.get("target_modules"), str):
        return fields
    if fields["target_modules"] == "all-linear":
        return fields
    prefix = "base_model.model."
    names = sorted(
        {
            key[len(prefix) :].split(".lora_")[0].split(".ia3_")[0]
            for key in tensors
            if key.startswith(prefix) and (".lora_" in key or ".ia3_" in key)
        }
    )
    if not names:
        raise ValueError(
            f"target_modules is a pattern ({str(fields['target_modules'])[:60]!r}) and the "
            "weights name no adapted module"
        )
    return {**fields, "target_modules": names, "exclude_modules": None}


def check_rank_against_tensors(fields: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Refuse a LoRA config whose ``r`` is not the rank its weights have: adapters are
    allocated from the config, so ``"r": 400000`` beside rank-4 weights would allocate
    gigabytes before any shape check (a folder is untrusted input)."""
    if not isinstance(fields, dict) or fields.get("rank_pattern") or "r" not in fields:
        return
    ranks = {t.shape[0] for key, t in tensors.items() if ".lora_A." in key and t.dim() >= 1}
    if ranks and ranks != {fields["r"]}:
        raise ValueError(
            f"r is {str(fields['r'])[:20]}, but the weights' lora_A tensors have rank "
            f"{sorted(ranks)[:4]}: the config does not belong to these weights"
        )


def recorded_base_quantization(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The base storage an adapter folder records (:data:`BASE_FILE`), or None."""
    path = Path(folder) / BASE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text()).get("base_quantization")
    except (ValueError, AttributeError) as error:
        raise AdapterConfigError(f"{path}: not the JSON this package writes ({error})") from error
    if not (isinstance(record, dict) and record.get("mode") in QUANT_MODES):
        raise AdapterConfigError(f"{path}: base_quantization must name a mode of {QUANT_MODES}")
    skip = record.get("skip_modules", [])
    if not (isinstance(skip, list) and all(isinstance(name, str) for name in skip)):
        raise AdapterConfigError(f"{path}: skip_modules must be a list of module names")
    kept = ("mode", "double_quant", "blocksize", "skip_modules")
    return {k: record[k] for k in kept if k in record}


def _base_storage(
    folder: Path, model: nn.Module, quantize: QuantMode | Literal["auto"] | None
) -> dict[str, Any] | None:
    """How to quantize ``model`` before attaching (None: not at all), and a warning when the
    base the adapter will run over differs from what the folder records."""
    recorded = recorded_base_quantization(folder)
    present = base_quantization(model)
    if present is not None:  # quantized already: as the caller chose
        if recorded is not None and present["mode"] != recorded["mode"]:
            _warn_other_base(folder, recorded["mode"], f"this model's {present['mode']} base")
        return None
    if quantize == "auto":
        return recorded
    if recorded is not None and quantize != recorded["mode"]:
        _warn_other_base(folder, recorded["mode"], f"quantize={quantize!r}")
    if quantize is None:
        return None
    if recorded is not None and quantize == recorded["mode"]:
        return recorded  # its blocksize, double quantization and float layers too
    return {"mode": quantize}


def _warn_other_base(folder: Path, mode: str, other: str) -> None:
    warnings.warn(
        f"{folder} was trained over a {mode} base, and {other} loads it over another: its "
        "answers will differ from the trained run's. quantize='auto' over a float model "
        "stores the base as recorded.",
        stacklevel=4,
    )


def _copy_peft_tensors(
    model: nn.Module,
    folder: Path,
    tensors: dict[str, torch.Tensor],
    config: Any,
    adapter_name: str,
) -> None:
    """Copy a PEFT file's tensors into ``model``'s adapter, every key and shape checked first."""
    host, _ = _host(model)
    mapping = _mapping(config)
    targets = _model_tensors(host, config, mapping, adapter_name)
    expected = {_file_key(key, mapping): key for key in targets}
    tensors = dict(tensors)
    mapping.loaded(host, config, tensors)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterStateError(
            f"{folder / WEIGHTS_FILE} does not fit the model's {type(config).__name__} adapter "
            f"{adapter_name!r}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(targets[v].shape)}"
        for k, v in expected.items()
        if tensors[k].shape != targets[v].shape
    ]
    if shapes:
        raise AdapterStateError(
            "PEFT tensor shapes differ from the model's:\n  " + "\n  ".join(shapes[:8])
        )
    check_adapter_values(tensors, str(folder / WEIGHTS_FILE))
    with torch.no_grad():
        for file_key, key in expected.items():
            targets[key].copy_(tensors[file_key])


# -- configs ---------------------------------------------------------------------------------


def _modules_to_save(model: nn.Module, names: Any) -> list[Unfreeze]:
    """An ``Unfreeze`` of the modules of ``model`` a PEFT ``modules_to_save`` list names
    (suffixes; PEFT lists ``["classifier", "score"]`` for any classifier, so names that match
    nothing are skipped), or none."""
    if not names:
        return []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise AdapterConfigError(f"modules_to_save must be a list of module names, got {names!r}")
    host, prefix = _host(model)
    paths = [  # Unfreeze trains the outermost of these (a head and its layers: the head)
        prefix + path
        for path, _ in host.named_modules()
        if path and any(path == n or path.endswith("." + n) for n in names)
    ]
    return [Unfreeze(target_modules="|".join(re.escape(p) for p in paths))] if paths else []


def _scaling_fields(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that decide what its tensors compute (shapes aside, which
    the tensors themselves check)."""
    mapping = peft_mapping(config)
    return mapping.scaling_fields(config) if mapping is not None else {}


def config_from_peft(fields: dict[str, Any]) -> Any:
    """This package's config for a PEFT ``adapter_config.json`` (as a dict).

    Raises:
        AdapterConfigError: a PEFT type or option not implemented here (each one named).
    """
    peft_type = fields.get("peft_type")
    mapping = peft_mapping_named(peft_type)
    if mapping is None:
        raise AdapterConfigError(
            f"PEFT type {peft_type!r} is not supported; lightning_peft reads "
            f"{', '.join(peft_types())}"
        )
    unsupported = [
        f"{key}={fields[key]!r}"
        for key, inert in _INERT.items()
        if key in fields and fields[key] not in inert
    ]
    unsupported += mapping.unsupported(fields)
    if unsupported:
        raise AdapterConfigError(
            f"this PEFT {peft_type} adapter uses options lightning_peft does not implement: "
            f"{', '.join(unsupported)}"
        )
    return mapping.config(fields)


# Options PEFT writes whose values here must be the inert ones (anything else changes the
# maths, and loading would silently compute something else).
_INERT: dict[str, tuple[Any, ...]] = {
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "layers_pattern": (None, [], ""),
    "use_qalora": (False, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "lora_bias": (False, None),
    "num_transformer_submodules": (1, 2, None),  # 2: encoder-decoder, checked on loading
    "alora_invocation_tokens": (None, []),  # activated LoRA: on only after those tokens
}


def _task_type(host: HFModel) -> str | None:
    name = type(host).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


# -- tensors ---------------------------------------------------------------------------------


def _host(model: nn.Module) -> tuple[nn.Module, str]:
    """The transformers model inside ``model`` (PEFT's ``base_model.model``) and its prefix."""
    try:
        host = find_transformers_model(model, "The PEFT format")
    except UnsupportedLayerError:
        return model, ""
    name = next(n for n, m in model.named_modules() if m is host)
    return host, f"{name}." if name else ""


def _names(model: nn.Module) -> set[str]:
    return {name for name, _ in adapter_configs_attached(model)}


def _single_config(model: nn.Module, adapter_name: str) -> tuple[Any, PeftMapping]:
    configs = [c for n, c in adapter_configs_attached(model) if n == adapter_name]
    if not configs:
        raise AdapterStateError(
            f"the model has no adapter named {adapter_name!r} (it has {sorted(_names(model))})"
        )
    # Whole modules trained beside the method (a task head) are PEFT's modules_to_save.
    methods = [c for c in configs if not isinstance(c, TrainsWholeModules)] or configs
    if len(methods) > 1:
        raise AdapterStateError(
            f"adapter {adapter_name!r} combines {len(methods)} configs "
            f"({', '.join(type(c).__name__ for c in methods)}); a PEFT directory holds one"
        )
    return methods[0], _mapping(methods[0])


def _mapping(config: Any) -> PeftMapping:
    mapping = peft_mapping(config)
    if mapping is None:
        raise AdapterConfigError(
            f"{type(config).__name__} has no Hugging Face PEFT equivalent; save it with "
            "adapter_state_dict or AdapterCheckpoint instead"
        )
    return mapping


def _saved_modules(host: HFModel, adapter_name: str) -> dict[str, nn.Module]:
    """Modules of ``host`` that adapter ``adapter_name`` trains whole (``Unfreeze``, a task
    head), by path: PEFT's ``modules_to_save``."""
    return {
        path: module
        for path, module in host.named_modules()
        if isinstance(trained_marks(module).get(adapter_name, (None,))[0], TrainsWholeModules)
    }


def _model_tensors(
    host: HFModel, config: Any, mapping: PeftMapping, adapter_name: str
) -> dict[str, torch.Tensor]:
    """The adapter's tensors in ``host``, keyed by module path and PEFT's tensor name, with
    the whole modules it trains (``modules_to_save``)."""
    tensors = mapping.tensors(host, adapter_name)
    for path, module in _saved_modules(host, adapter_name).items():
        for name, tensor in module.named_parameters():
            tensors[f"{path}.{name}"] = tensor
    if not tensors:
        raise AdapterStateError(f"no {type(config).__name__} tensors named {adapter_name!r} found")
    return tensors


def _file_key(key: str, mapping: PeftMapping) -> str:
    if key == PROMPT:
        return key
    # Prompt learning wraps the model itself: its modules_to_save sit under "base_model.".
    return ("base_model." if mapping.prompt_learning else PREFIX) + key
