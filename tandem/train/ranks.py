"""Data-parallel training: the process group a launcher (torchrun) sets up, and DDP around a loss.

One ``Ranks`` describes this process's place in a group of ``world``
processes started by ``torchrun`` (or anything that sets the same
environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Every rank holds the whole model and the whole data set
and walks the same seeded batch order; each takes its slice of every global
batch (``shard``), and DistributedDataParallel sums the gradients over the
ranks (gloo on CPU, nccl on CUDA) during the backward pass, so every rank
takes the same optimizer step. The caller scales each rank's summed loss by
``world / tokens in the global batch``; DDP's average of the ranks'
gradients is then the gradient of the global batch's mean loss, the step a
single process takes on the same batch.

torch is imported here at module level: only the training processes import
this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tandem.train.lora import collate_batch, target_logits
from tandem.train.sft import TokenizedExample

#: What a launcher sets in every process's environment.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class SummedCompletionLoss(torch.nn.Module):
    """The summed cross-entropy over a batch's completion tokens (``target_logits``) as a module's
    forward, so that DDP sees the forward pass whose backward it syncs."""

    def __init__(self, causal_lm: torch.nn.Module) -> None:
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, ids, attn, target):
        logits, tokens = target_logits(self.causal_lm, ids, attn, target)
        return F.cross_entropy(logits, tokens, reduction="sum")


@dataclass(frozen=True)
class Ranks:
    """This process's rank among ``world`` training processes, and the device it trains on."""

    rank: int
    world: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, reports progress and writes the adapter."""
        return self.rank == 0

    def shard(self, rows: Sequence[TokenizedExample]) -> list[TokenizedExample]:
        """This rank's rows of a global batch: every ``world``-th row from ``rank`` (may be empty)."""
        return list(rows[self.rank :: self.world])

    def wrap(self, causal_lm: torch.nn.Module) -> torch.nn.Module:
        """``SummedCompletionLoss`` of ``causal_lm`` under DDP: a backward pass through it all-reduces
        the gradients of the trainable parameters."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device.startswith("cuda") else None
        return DistributedDataParallel(SummedCompletionLoss(causal_lm), device_ids=ids)

    def batch_loss(self, net: torch.nn.Module, rows: Sequence[TokenizedExample], pad_id: int):
        """This rank's loss to backpropagate through ``net`` (``wrap``), and the global batch's mean loss.

        The rank's summed loss times ``world / completion tokens in the batch``,
        so DDP's gradient average is the single-process step on the whole
        batch. A rank without rows (a short last batch) runs the batch's first
        row with weight 0, so it still joins the all-reduce.
        """
        mine = self.shard(rows)
        tokens = sum(r.n_completion for r in rows)
        summed = net(*collate_batch(mine or list(rows[:1]), pad_id, self.device))
        value = self.total(summed.item() if mine else 0.0) / tokens
        return summed * (self.world / tokens if mine else 0.0), value

    def total(self, value: float) -> float:
        """``value`` summed over all ranks (every rank gets the sum)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def barrier(self) -> None:
        dist.barrier()


def under_launcher() -> bool:
    """Whether this process was started by torchrun (or a launcher that sets the same environment)."""
    return all(name in os.environ for name in LAUNCHER_ENV)


def rank_device(device: str | None, local_rank: int, world: int) -> str:
    """The device of the rank with ``local_rank``: ``cuda:LOCAL_RANK`` for ``cuda``/unset with a GPU, else ``cpu``.

    A device naming one GPU (``cuda:3``) serves one process only: with
    several, each rank takes the GPU of its local rank among the visible ones
    (``CUDA_VISIBLE_DEVICES`` picks which).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda":
        return f"cuda:{local_rank}"
    if device.startswith("cuda:") and world == 1:
        return device
    raise ValueError(
        f"[lora] device = {device!r} with {world} training processes: use 'cuda' (each process takes the GPU "
        "of its local rank; CUDA_VISIBLE_DEVICES picks which GPUs) or 'cpu'"
    )


def join(device: str | None) -> Ranks:
    """Join the process group that the launcher describes in the environment (nccl on CUDA, gloo on CPU)."""
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(f"not started by torchrun: {', '.join(missing)} not set")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = rank_device(device, local, world)
    if dev.startswith("cuda"):
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return Ranks(rank=rank, world=world, local_rank=local, device=dev)


def leave() -> None:
    """Leave the process group (at the end of a training process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
