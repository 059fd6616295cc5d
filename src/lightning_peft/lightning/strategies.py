"""``AdapterModelParallelStrategy``: FSDP2 that gathers only the adapters for a checkpoint."""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from lightning_peft.injection import adapter_parameter_names
from lightning_peft.lightning.checkpointing import write_adapter_only_


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

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        # The metadata's base fingerprint gathers sharded tensors, a collective every rank
        # must join; the checkpoint IO, which would write it otherwise, runs on rank 0 only.
        assert self.lightning_module is not None
        write_adapter_only_(checkpoint, self.lightning_module)
        super().save_checkpoint(checkpoint, filepath, storage_options)
