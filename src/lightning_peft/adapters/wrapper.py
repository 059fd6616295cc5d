"""What every layer-wrapping adapter shares: the base layer's state-dict keys and attributes.

A wrapper saves its base layer's tensors under the base's own names (``q_proj.weight``, not
``q_proj.base_layer.weight``), so a base checkpoint loads into an adapted model and an
adapter-only checkpoint names tensors as the plain model does. Attributes the wrapper lacks
resolve on the base: model code reads ``self.q_proj.weight.dtype``, and
torch.distributed.checkpoint walks attributes by state-dict key.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from lightning_peft._compat import own_children, own_names
from lightning_peft.errors import AdapterStateError


class BaseLayerWrapper(nn.Module):
    """An ``nn.Module`` holding ``base_layer`` and presenting it as itself to the outside."""

    # Any linear-like layer (nn.Linear, transformers' Conv1D, bitsandbytes' 4-bit and 8-bit
    # layers, embeddings, convolutions): typed by what they share, their use, not a class.
    base_layer: Any

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_state_dict_post_hook(_base_keys_without_wrapper)
        self.register_load_state_dict_pre_hook(_base_keys_into_wrapper)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base_layer = own_children(self).get("base_layer")
            if base_layer is None:
                raise
            return getattr(base_layer, name)


class LinearDict(nn.ModuleDict):
    """An ``nn.ModuleDict`` of ``nn.Linear`` (LoRA's factors by adapter name), typed so."""

    def __getitem__(self, key: str) -> nn.Linear:
        return cast(nn.Linear, super().__getitem__(key))


class NamedAdapters:
    """What wrappers holding several named adapters share (LoRA, IA3): their ``configs``
    (name -> config) and the ``active_adapters`` the forward applies."""

    configs: dict[str, Any]
    active_adapters: list[str]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    @property
    def adapter_name(self) -> str:
        """The adapter a single-adapter operation (merge, ``lora_a``) acts on: the only
        active one."""
        if len(self.active_adapters) != 1:
            raise AdapterStateError(
                f"this operation needs exactly one active adapter, the layer has "
                f"{self.active_adapters}; choose one with set_active_adapters(model, [name])"
            )
        return self.active_adapters[0]

    @property
    def config(self) -> Any:
        return self.configs[self.adapter_name]


def _base_keys_without_wrapper(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict post-hook: ``<prefix>base_layer.weight`` is saved as ``<prefix>weight``."""
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(prefix)]:  # keeps their relative order
        value = state_dict.pop(key)
        state_dict[prefix + key[len(inner) :] if key.startswith(inner) else key] = value


def _base_keys_into_wrapper(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load pre-hook: keys that are not the wrapper's own go to the base layer."""
    own = own_names(module)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :].split(".", 1)[0] not in own:
            state_dict[prefix + "base_layer." + key[len(prefix) :]] = state_dict.pop(key)
