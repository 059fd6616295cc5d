"""How prompt and prefix tuning reach a transformers model: hooks on its forward inputs.

Both methods add virtual tokens the caller never sees. A forward pre-hook on the outermost
transformers model (the one taking ``input_ids``, ``attention_mask``, ``labels``) rewrites
its keyword arguments; the caller's tensors keep their shapes, also inside ``generate``,
which calls the same forward step by step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lightning_peft.errors import AdapterConfigError, UnsupportedLayerError

# A transformers model (``PreTrainedModel``): typed Any, since its config fields and methods
# are its model class's own, and transformers is never imported just to name the type.
HFModel = Any


def find_transformers_model(model: nn.Module, method: str) -> HFModel:
    """The outermost module of ``model`` that is a transformers model (a config and input
    embeddings: tokens, or patches and audio frames for ViT and Whisper). Typed ``Any``: its
    config and methods are the model class's own.

    Raises:
        UnsupportedLayerError: ``model`` contains none.
    """
    for _, module in model.named_modules():
        if hasattr(module, "config") and callable(getattr(module, "get_input_embeddings", None)):
            return module
    raise UnsupportedLayerError(
        f"{method} needs a transformers model (one with get_input_embeddings() and a config) "
        f"inside {type(model).__name__}, and found none; wrap a model from "
        "transformers.AutoModelFor... or use a layer method such as LoRA."
    )


def is_encoder_decoder(host: HFModel) -> bool:
    config = getattr(host, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and callable(
        getattr(host, "get_encoder", None)
    )


def as_keyword_arguments(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model.forward``'s positional ``args`` folded into ``kwargs`` by parameter name."""
    if not args:
        return dict(kwargs)
    names = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return {**dict(zip(names, args, strict=False)), **kwargs}


def prepend_ones(mask: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """A 2D ``(batch, length)`` attention mask with ``count`` attended positions in front."""
    if mask is None or mask.dim() != 2:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)


# transformers 5.24 renamed the key/value cache argument ``past_key_values`` to ``cache``
# (the old name warns and goes away in 5.40); earlier releases know only the old name.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def takes_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` can be given a key/value cache: under either name, or
    through ``**kwargs`` (transformers 5 models pass those on to their layers)."""
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.name in CACHE_ARGUMENTS or p.kind == p.VAR_KEYWORD for p in parameters)


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its key/value cache."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The key/value cache among a forward's keyword arguments, under either name, or None."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output: Any) -> Any:
    """The key/value cache a transformers forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def text_config(model: nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def text_token_ids(
    text: str | None, tokenizer_name_or_path: str | None, count: int
) -> torch.Tensor:
    """The token ids of ``text``, repeated or cut to ``count`` (a text-initialised prompt).

    Raises:
        AdapterConfigError: no text or tokenizer, or a text without tokens.
    """
    from transformers import AutoTokenizer

    if text is None or tokenizer_name_or_path is None:
        raise AdapterConfigError("init='text' needs init_text and tokenizer_name_or_path")

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not token_ids:
        raise AdapterConfigError(f"init_text {text!r} has no tokens")
    return torch.tensor((token_ids * (count // len(token_ids) + 1))[:count])


def virtual_token_problems(config: Any) -> list[str]:
    """What is wrong with the fields prompt and prefix tuning share: ``num_virtual_tokens``,
    ``init``, ``init_text`` and ``tokenizer_name_or_path``."""
    problems = []
    n = config.num_virtual_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        problems.append(f"num_virtual_tokens must be a positive int, got {n!r}")
    if config.init not in ("random", "text"):
        problems.append(f"init must be 'random' or 'text', got {config.init!r}")
    if config.init == "text" and not (config.init_text and config.tokenizer_name_or_path):
        problems.append(
            "init='text' needs init_text and tokenizer_name_or_path, got "
            f"init_text={config.init_text!r}, "
            f"tokenizer_name_or_path={config.tokenizer_name_or_path!r}"
        )
    return problems
