"""One training run for the distributed tests, as a user would launch it: a script.

Lightning's "ddp" launcher starts the other ranks by running this script again, so the
tests run it in a subprocess: rank 0 alone, which starts rank 1, or both ranks at once with
``LOCAL_RANK`` set as that launcher sets it (tests/distributed/test_data_parallel.py). Rank 0
saves the final adapter tensors and the per-step losses to --out.

    python tests/distributed/worker.py --strategy ddp --design callback --base nf4 --steps 3 \
        --out r.pt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: the tests package

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed._composable.fsdp import fully_shard
from torch.utils.data import DataLoader, Sampler

import lightning_peft
from lightning_peft import (
    AdapterCheckpoint,
    AdapterModelParallelStrategy,
    Distillation,
    LoRA,
    PeftCallback,
    PeftPrecision,
    adapter_state_dict,
)
from tests import cpu_paths
from tests.lightning_modules import CausalLM, LossRecorder, MixinLM
from tests.tiny_models import VOCAB, tiny_llama

cpu_paths.apply_from_environment()

LORA = LoRA(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
GLOBAL_BATCH = 4


def shard(module: L.LightningModule) -> None:
    """FSDP2: each decoder layer, then the whole model, sharded over the data-parallel ranks."""
    for layer in module.model.model.layers:
        fully_shard(layer)
    fully_shard(module.model)


class ShardedLM(CausalLM):
    def configure_model(self) -> None:
        super().configure_model()
        shard(self)


class ShardedMixinLM(MixinLM):
    def configure_model(self) -> None:
        super().configure_model()  # the mixin attaches the adapters before sharding
        shard(self)


class StridedSampler(Sampler):
    """Rank r of w reads rows r, r + w, ...: the ranks' batches of 4 / w rows together are
    the single process's batch of 4. (Lightning's own DistributedSampler always shuffles.)"""

    def __init__(self, size: int) -> None:
        self.size = size

    def _rank_and_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._rank_and_world()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        rank, world = self._rank_and_world()
        return len(range(rank, self.size, world))


def data(devices: int) -> DataLoader:
    # 12 rows, 3 steps an epoch: a checkpoint at step 3 ends an epoch, so resuming replays
    # no data (mid-epoch, Lightning would restart the epoch of a plain DataLoader).
    rows = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(7))
    return DataLoader(
        list(rows), batch_size=GLOBAL_BATCH // devices, sampler=StridedSampler(len(rows))
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--strategy",
        # fsdp2: AdapterModelParallelStrategy; fsdp2-lightning: Lightning's own, one file
        choices=["single", "ddp", "ddp_spawn", "fsdp2", "fsdp2-lightning"],
        required=True,
    )
    parser.add_argument(
        "--design",
        choices=["callback", "mixin", "precision", "precision-adamw", "plugin"],
        default="callback",
    )
    parser.add_argument("--base", choices=["fp32", "nf4"], default="fp32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--ckpt-dir", type=Path)
    parser.add_argument("--resume", type=str)
    parser.add_argument("--different-base", action="store_true", help="seed the base by rank")
    parser.add_argument("--distill", action="store_true", help="a Distillation teacher too")
    parser.add_argument(
        "--seed-first", action="store_true", help="seed, then build the module (draws after)"
    )
    args = parser.parse_args()
    if args.seed_first:
        L.seed_everything(123, verbose=False)

    devices = 1 if args.strategy == "single" else 2
    base_seed = int(os.environ.get("LOCAL_RANK", "0")) if args.different_base else 0
    sharded = args.strategy.startswith("fsdp2")
    nf4 = args.base == "nf4" and args.design not in ("precision", "precision-adamw", "plugin")
    if args.design == "mixin":
        module = (ShardedMixinLM if sharded else MixinLM)(
            base_seed=base_seed, nf4=nf4, adapters=LORA
        )
    else:
        module = (ShardedLM if sharded else CausalLM)(base_seed=base_seed, nf4=nf4)

    callbacks: list = [LossRecorder()]
    if args.design == "callback":
        callbacks.append(PeftCallback(LORA))
    if args.distill:
        callbacks.append(Distillation(tiny_llama(seed=5), temperature=2.0, alpha=0.5))
    if args.save_every:
        callbacks.append(
            AdapterCheckpoint(
                dirpath=args.ckpt_dir,
                filename="{step}",
                every_n_train_steps=args.save_every,
                save_top_k=-1,
            )
        )
    strategy = args.strategy if args.strategy in ("ddp", "ddp_spawn") else "auto"
    if args.strategy == "fsdp2":
        strategy = AdapterModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    elif args.strategy == "fsdp2-lightning":
        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    flag = args.design in ("precision", "precision-adamw")
    trainer_class = lightning_peft.Trainer if flag else L.Trainer
    if not args.seed_first:
        L.seed_everything(123, verbose=False)
    extra: dict = {
        "precision": {"precision": "nf4-lora"},
        # The flag's quantization with the module's own AdamW: what FSDP2 runs.
        "precision-adamw": {"plugins": [PeftPrecision("nf4-lora", optimizer=None)]},
        # The plugin alone: it attaches its adapters late, in strategy.setup.
        "plugin": {"plugins": [PeftPrecision("nf4-lora", adapters=LORA)]},
    }.get(args.design, {})
    trainer = trainer_class(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.save_every),
        use_distributed_sampler=False,
        callbacks=callbacks,
        **extra,
    )
    trainer.fit(module, data(devices), ckpt_path=args.resume)
    adapters = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
        for k, v in adapter_state_dict(module).items()
    }
    if trainer.global_rank == 0:
        torch.save(
            {"adapters": adapters, "losses": callbacks[0].losses, "step": trainer.global_step},
            args.out,
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the gloo group up; torn down by interpreter exit, its threads
        # sometimes abort the process ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
