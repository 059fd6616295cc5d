"""Methods that train tensors the base model already has, instead of adding new ones.

``BitFit`` (Ben Zaken et al. 2021) trains only the bias terms: of every layer by default,
LayerNorm included (§2). ``Unfreeze`` trains whole modules, typically a freshly initialised
task head (a classifier) next to adapters elsewhere; Hugging Face PEFT calls this
``modules_to_save``.

Neither adds a module: they mark the modules that own the tensors (see
:func:`lightning_peft.protocol.mark_trained_`), so state-dict keys do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_peft._compat import own_parameter
from lightning_peft.errors import TargetModulesError
from lightning_peft.protocol import WrappingAdapter, mark_trained_
from lightning_peft.targeting import (
    Patterns,
    candidate_modules,
    find_targets,
    finish_config_,
    normalize_patterns,
)


@dataclass(frozen=True)
class BitFit:
    """Train the bias terms only.

    Args:
        target_modules: a regex over module names whose biases train (default: all), or a
            list of name suffixes.
        exclude_modules: patterns whose biases stay frozen.

    Raises:
        AdapterConfigError: an invalid pattern (with the value received).
    """

    target_modules: Patterns = ".*"
    exclude_modules: Patterns = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        targets = normalize_patterns(self.target_modules, "target_modules", problems)
        excludes = normalize_patterns(self.exclude_modules, "exclude_modules", problems)
        finish_config_(self, problems, target_modules=targets, exclude_modules=excludes)

    def check(self, model: nn.Module) -> None:
        self._biased_modules(model)

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        for module in self._biased_modules(model):
            mark_trained_(module, ("bias",), self, adapter_name)

    def _biased_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules selected by the patterns that own a bias ``nn.Parameter``."""
        selected = _selected_names(self, model)
        owners = {name: module for name, module in _bias_owners(model)}
        chosen = [owners[name] for name in selected if name in owners]
        if not chosen:
            raise TargetModulesError(
                f"BitFit found no bias to train in the modules target_modules="
                f"{self.target_modules!r} selects in {type(model).__name__}: its layers were "
                "built without bias terms (Llama-style models have none). Pick a model with "
                "biases, or another method such as LoRA or IA3."
            )
        return chosen


def _bias_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for modules with a bias parameter, an adapter's base layer named as
    its wrapper (that is the name users and state dicts see)."""
    owners = []
    for name, module in candidate_modules(model).items():
        owner = module.base_layer if isinstance(module, WrappingAdapter) else module
        if isinstance(own_parameter(owner, "bias"), nn.Parameter):
            owners.append((name, owner))
    return owners


@dataclass(frozen=True)
class Unfreeze:
    """Train every tensor of the selected modules, e.g. a new classification head.

    Args:
        target_modules: module-name suffixes (``["classifier"]``) or a regex.
        exclude_modules: patterns left frozen.

    Raises:
        AdapterConfigError: an invalid or empty pattern (with the value received).
    """

    target_modules: Patterns = ()
    exclude_modules: Patterns = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        targets = normalize_patterns(self.target_modules, "target_modules", problems)
        excludes = normalize_patterns(self.exclude_modules, "exclude_modules", problems)
        if targets == () and not problems:
            problems.append(
                "target_modules must name the modules to train, e.g. ['classifier'], got ()"
            )
        finish_config_(self, problems, target_modules=targets, exclude_modules=excludes)

    def check(self, model: nn.Module) -> None:
        self._selected(model)

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        for module in self._selected(model):
            names = tuple(name for name, _ in module.named_parameters())
            mark_trained_(module, names, self, adapter_name)

    def selected_names(self, model: nn.Module) -> list[str]:
        """Names of the modules this config trains, outermost only (a selected module's
        children are covered by the module itself)."""
        selected = _selected_names(self, model)
        return [n for n in selected if not any(n.startswith(p + ".") for p in selected)]

    def _selected(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(name) for name in self.selected_names(model)]


def _selected_names(config: BitFit | Unfreeze, model: nn.Module) -> list[str]:
    """Names of the modules ``config``'s patterns select: of any type, adapted or not (these
    methods train tensors modules already have; they wrap nothing)."""
    return find_targets(
        model,
        config.target_modules,
        config.exclude_modules,
        can_wrap=lambda module: True,
        method=type(config).__name__,
        allow_adapted=True,
        wraps=False,
    )
