"""``AdapterModelParallelStrategy``: FSDP2 that gathers only the adapters for a checkpoint."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from lightning_peft.injection import adapter_parameter_names


class AdapterModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) for adapter training.

    Lightning's strategy gathers the whole model, frozen base included, on every save before
    any callback can drop it; this one gathers only the tensors that require grad, and
    writes one full-state file (``save_distributed_checkpoint=False``) that a single
    process, DDP or FSDP2 run can resume from. All other arguments are Lightning's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("save_distributed_checkpoint"):
            raise ValueError(
                "AdapterModelParallelStrategy writes one adapter-only file; "
                "save_distributed_checkpoint=True (sharded folders) is not supported"
            )
        kwargs["save_distributed_checkpoint"] = False
        super().__init__(*args, **kwargs)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        assert module is not None
        state = {}
        for name in adapter_parameter_names(module):  # same order on every rank: collectives
            tensor = module.get_parameter(name).detach()
            if hasattr(tensor, "full_tensor"):  # a DTensor shard: gather this adapter only
                tensor = tensor.full_tensor()
            state[name] = tensor.cpu()
        return state if self.global_rank == 0 else {}
