"""A merged, standalone export: the adapted model as a plain transformers checkpoint.

The copy is dequantized to full precision, each LoRA / IA3 update is folded into its weight,
the wrappers are removed, and ``save_pretrained`` writes it: ``AutoModelFor...from_pretrained``
loads the result with no trace of this package. The model passed in is left as it was.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, cast

import torch
from torch import nn

from lightning_peft.adapters.inputs import find_transformers_model
from lightning_peft.checkpoint.io import check_folder_target, owned_with_tokenizer, staged_folder
from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.injection import adapter_modules, replace_module_
from lightning_peft.merging import MergeReport, untie_base_weight_
from lightning_peft.protocol import (
    MergeableAdapter,
    NamedAdapterModule,
    held_adapter_names,
)
from lightning_peft.quantization import dequantize_model


def merge_and_export(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> MergeReport:
    """Save ``model`` with its adapters merged, as an ordinary transformers checkpoint.

    Args:
        directory: a new or empty folder; it appears whole once the export is complete. A
            folder holding other files is refused unless ``overwrite``.
        adapter_name: which adapter to merge when layers hold several (default: the active
            ones, one per layer).
        dtype: the weights' dtype in the export.
        tokenizer: a transformers tokenizer to save beside the model (its files and chat
            template), so ``from_pretrained`` finds both in the folder.
        overwrite: write into a folder that holds other files: the export's own files
            (``config.json``, ``model*.safetensors``, ...) are replaced once the new ones are
            complete; nothing else there (a tokenizer, notes, checkpoints) is touched.

    Returns:
        The merge report of the copy (errors 0.0: the copy is full precision).

    Raises:
        AdapterConfigError: an attached method cannot be merged into weights (prompt or
            prefix tuning, bottleneck adapters): save it with ``save_peft`` instead.
        AdapterStateError: the model has no adapters.
        FileExistsError: ``directory`` is a file, or holds other files and not ``overwrite``
            (checked before any work).
    """
    owned = owned_with_tokenizer(is_export_file, tokenizer)
    check_folder_target(directory, owned, overwrite=overwrite)
    host = find_transformers_model(model, "merge_and_export")
    adapters = list(adapter_modules(host))
    if not adapters:
        raise AdapterStateError(f"{type(host).__name__} has no adapters to merge")
    unmergeable = sorted(
        {type(m).__name__ for _, m in adapters if not isinstance(m, MergeableAdapter)}
    )
    if unmergeable:
        raise AdapterConfigError(
            f"{', '.join(unmergeable)} cannot be merged into the weights; save those adapters "
            "with save_peft (or adapter_state_dict) and load them on the base instead"
        )
    exported = copy.deepcopy(host)
    dequantize_model(exported, dtype=torch.float32)
    errors: dict[str, float] = {}
    # Innermost first: an attention's out_proj wrapper sits inside the attention's wrapper.
    wrappers = sorted(adapter_modules(exported), key=lambda item: -item[0].count("."))
    for name, wrapper in wrappers:
        if adapter_name is not None:
            if adapter_name not in held_adapter_names(wrapper):
                _unwrap(exported, name, wrapper)
                continue
            if isinstance(wrapper, NamedAdapterModule):
                wrapper.active_adapters = [adapter_name]
        wrapper.disabled = False
        untie_base_weight_(exported, wrapper)
        errors[name] = wrapper.merge()
        _unwrap(exported, name, wrapper)
    exported.to(dtype)
    _forget_quantization(exported)
    with staged_folder(directory, owned, overwrite=overwrite) as staging:
        exported.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return MergeReport(len(errors), 0, errors)


def _unwrap(model: nn.Module, name: str, wrapper: Any) -> None:
    layer = wrapper.base_layer
    layer.requires_grad_(True)  # an ordinary checkpoint: nothing frozen by us
    replace_module_(model, wrapper, layer)


def _forget_quantization(model: nn.Module) -> None:
    # An ordinary model again: its save_pretrained writes the whole model, not adapters.
    vars(model).pop("save_pretrained", None)
    for attribute in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, attribute, False):
            setattr(model, attribute, False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        cast(Any, model).hf_quantizer = None


# What save_pretrained writes for a model: a merged export owns these names in its folder.
_EXPORT_FILES = re.compile(
    r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?"
)


def is_export_file(name: str) -> bool:
    """Whether ``name`` is one of the files ``save_pretrained`` writes for a model."""
    return _EXPORT_FILES.fullmatch(name) is not None
