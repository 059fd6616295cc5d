"""Which modules get adapters: name suffixes, a regex, or ``"all-linear"``, minus exclusions.

Patterns follow Hugging Face PEFT so configs carry over: a list of strings matches module
names by suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a single string
is a regular expression matched against the whole name, and ``"all-linear"`` selects every
linear layer except the output head.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from typing import Union

from torch import nn

from lightning_peft.errors import AdapterConfigError, TargetModulesError, UnsupportedLayerError
from lightning_peft.protocol import WrappingAdapter, is_adapter
from lightning_peft.quantization.layers import (
    is_linear_layer,
    linear_layer_types,
    output_head_names,
)

ALL_LINEAR = "all-linear"
Patterns = Union[str, Sequence[str]]  # noqa: UP007 (jsonargparse builds the CLI from it)


def finish_config_(config: object, problems: list[str], **normalized: object) -> None:
    """End a frozen config's ``__post_init__``: raise one error listing every problem found,
    else store the ``normalized`` field values (as :func:`normalize_patterns` made them)."""
    if problems:
        raise AdapterConfigError(
            f"invalid {type(config).__name__} config:\n  - " + "\n  - ".join(problems)
        )
    for field, value in normalized.items():
        object.__setattr__(config, field, value)


def normalize_patterns(value: Patterns, field: str, problems: list[str]) -> str | tuple[str, ...]:
    """``value`` as a regex string or a tuple of suffixes; appends what is wrong to ``problems``."""
    if isinstance(value, str):
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as err:
                problems.append(f"{field} is not a valid regular expression ({err}), got {value!r}")
        return value
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        problems.append(
            f"{field} must be a regex string, 'all-linear' or a list of module-name suffixes, "
            f"got {value!r}"
        )
        return ()
    return tuple(value)


def matches(name: str, patterns: Patterns) -> bool:
    """True if the module name ``name`` is selected by ``patterns`` (``all-linear`` excluded)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == suffix or name.endswith("." + suffix) for suffix in patterns)


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules of ``model``, leaving out adapters' insides (their base layer included)."""
    found: dict[str, nn.Module] = {}
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip_prefixes):
            continue
        found[name] = module
        if is_adapter(module):
            skip_prefixes.append(name + ".")
    return found


def find_targets(
    model: nn.Module,
    target_modules: Patterns,
    exclude_modules: Patterns = (),
    *,
    can_wrap: Callable[[nn.Module], bool] = is_linear_layer,
    method: str = "LoRA",
    allow_adapted: bool = False,
    wraps: bool = True,
) -> list[str]:
    """Names of the modules of ``model`` that ``target_modules`` selects, in model order.

    Raises:
        TargetModulesError: a pattern selects no module (the closest names are listed), or
            the exclusions remove every match.
        UnsupportedLayerError: a selected module is not a layer ``method`` can wrap.

    ``allow_adapted`` selects adapted layers too (judged by the layer they wrap): BitFit
    trains their biases, and a second named adapter of the same method joins them.
    ``wraps=False``: the method trains tensors in place (BitFit) rather than wrapping layers,
    so layers that others read directly (``nn.MultiheadAttention``'s) are fine.
    """
    modules = candidate_modules(model)
    names = [name for name in modules if name]  # "" is the model itself
    attention = read_directly(modules)
    if target_modules == ALL_LINEAR:
        heads = output_head_names(modules)
        # nn.MultiheadAttention's projections are linear maps it applies itself: the
        # attention is one target, for methods that wrap it.
        selected = [
            n
            for n in names
            if n not in heads
            and not any(n.startswith(a + ".") for a in attention)
            and (
                is_linear_layer(modules[n])
                or (allow_adapted and is_linear_layer(_inner(modules[n])))
                or (n in attention and can_wrap(_inner(modules[n])))
            )
        ]
        if not selected:
            raise TargetModulesError(
                f"target_modules='all-linear' found no linear layer besides the output head "
                f"in {type(model).__name__}; supported layer types: {_type_names()}"
            )
    elif not target_modules:
        raise TargetModulesError(
            f"{method}: target_modules is empty (got {target_modules!r}); name module suffixes "
            "such as ['q_proj', 'v_proj'], a regular expression, or 'all-linear'"
        )
    else:
        selected = [n for n in names if matches(n, target_modules)]
        _check_every_pattern_matched(target_modules, names)
    excluded = [n for n in selected if exclude_modules and matches(n, exclude_modules)]
    kept = [n for n in selected if n not in excluded]
    if not kept:
        raise TargetModulesError(
            f"exclude_modules={exclude_modules!r} removed every module that target_modules="
            f"{target_modules!r} selected "
            f"({', '.join(excluded[:5])}{', ...' if len(excluded) > 5 else ''})"
        )
    inside = [n for n in kept if wraps and any(n.startswith(a + ".") for a in attention)]
    if inside:
        owner = next(a for a in attention if inside[0].startswith(a + "."))
        instead = (
            f"Target {owner} itself ({method} then adapts its q, k, v and out projections)"
            if can_wrap(_inner(modules[owner]))
            else "Leave it out (exclude_modules)"
        )
        raise UnsupportedLayerError(
            f"{inside[0]} is inside the nn.MultiheadAttention {owner}, which reads its weight "
            f"directly and never calls it: an adapter there would never act. {instead}"
        )
    adapted = [n for n in kept if is_adapter(modules[n])]
    if adapted and not allow_adapted:
        raise TargetModulesError(
            f"these modules already carry an adapter: {', '.join(adapted[:5])}. A layer takes "
            "one adapter; leave these out with exclude_modules or target other layers."
        )
    unsupported = [n for n in kept if not can_wrap(_inner(modules[n]))]
    if unsupported:
        raise UnsupportedLayerError(_unsupported_message(unsupported, modules, method))
    return kept


def read_directly(modules: dict[str, nn.Module]) -> list[str]:
    """Names of modules that read their submodules' weights instead of calling them
    (``nn.MultiheadAttention`` and its ``out_proj``), adapted ones included."""
    return [n for n, m in modules.items() if isinstance(_inner(m), nn.MultiheadAttention)]


def _inner(module: nn.Module) -> nn.Module:
    """The layer an adapter wraps (the module itself if it wraps none)."""
    return module.base_layer if isinstance(module, WrappingAdapter) else module


def _check_every_pattern_matched(target_modules: Patterns, names: list[str]) -> None:
    if isinstance(target_modules, str):
        if not any(matches(n, target_modules) for n in names):
            closest = difflib.get_close_matches(target_modules, names, n=5, cutoff=0.3)
            hint = (
                "A string is a regular expression matched against the full module name; "
                f"to match by suffix pass a list, e.g. target_modules=[{target_modules!r}]."
            )
            raise TargetModulesError(_no_match_message(target_modules, closest, hint))
        return
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    for suffix in target_modules:
        if not any(matches(n, (suffix,)) for n in names):
            closest = difflib.get_close_matches(suffix.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.3)
            hint = "Names are matched as suffixes of the full module name, e.g. 'self_attn.q_proj'."
            raise TargetModulesError(_no_match_message(suffix, closest, hint))


def _no_match_message(pattern: str, closest: list[str], hint: str) -> str:
    return (
        f"target_modules pattern {pattern!r} matched no module; closest module names: "
        f"{', '.join(closest) if closest else '(none)'}. {hint}"
    )


def _unsupported_message(unsupported: list[str], modules: dict[str, nn.Module], method: str) -> str:
    lines = [f"{method} cannot wrap these selected modules:"]
    lines += [f"  {n} ({type(modules[n]).__name__})" for n in unsupported[:10]]
    inside = [
        n
        for n in modules
        if is_linear_layer(modules[n]) and any(n.startswith(u + ".") for u in unsupported)
    ]
    hint = f"{method} wraps these layer types: {_type_names(method)}."
    if inside:
        hint += f" Target the linear layers inside instead, e.g. {', '.join(inside[:4])}."
    return "\n".join([*lines, hint])


# Layer types a method wraps beside the linear ones (see each method's can_wrap).
_MORE_TYPES = {
    "LoRA": ("Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention"),
    "IA3": ("Conv1d", "Conv2d", "Conv3d"),
}


def _type_names(method: str = "") -> str:
    names = [cls.__name__ for cls in linear_layer_types()]
    return ", ".join([*names, *_MORE_TYPES.get(method, ())])
