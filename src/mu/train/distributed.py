"""torchrun support: process group set-up, DDP/FSDP wrapping, small collectives.

Under `torchrun --nproc_per_node=N -m mu train ...` the environment carries RANK, WORLD_SIZE and
LOCAL_RANK; the backend is NCCL on CUDA and gloo on CPU. Without torchrun everything here is a
no-op for one process.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from mu.errors import MuError
from mu.utils import pick_device


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.strategy == "fsdp"


def init_distributed(device_name: str, strategy: str = "auto") -> DistEnv:
    """Read torchrun's environment, pick this process's device, start the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "ddp" and world == 1:
        strategy = "none"  # DDP of one process is plain training
    if strategy == "fsdp" and "MASTER_ADDR" not in os.environ:
        raise MuError("--distributed fsdp needs a process group: launch with torchrun (even --nproc_per_node=1)")
    if (world > 1 or strategy == "fsdp") and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    if world > 1 and device.type == "cpu":
        note = cpu_thread_share(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if rank == 0:
            print(note, file=sys.stderr, flush=True)
    return DistEnv(rank, world, local_rank, device, strategy)


def cpu_thread_share(processes: int) -> str:
    """Give this process at most its share of the machine's cores (cores // processes on this node) and say so.

    torch sizes its thread pool from OMP_NUM_THREADS, or the whole machine when unset; with several training
    processes on one CPU node that oversubscribes the cores (2 processes x 2 threads on 2 cores ran ~3x slower
    than 1 process). A smaller OMP_NUM_THREADS (torchrun sets 1 when unset) is kept. Returns the log line.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, processes))
    asked = torch.get_num_threads()
    threads = min(asked, share)
    if threads != asked:
        torch.set_num_threads(threads)
    omp = os.environ.get("OMP_NUM_THREADS")
    source = f"OMP_NUM_THREADS={omp}" if omp else "torch's default"
    if asked > share:
        why = f"{source} asked for {asked}, which would oversubscribe the cores"
    elif asked < share:
        why = f"{source}; set OMP_NUM_THREADS={share} to use every core"
    else:
        why = source
    return f"cpu threads: {threads} per process ({processes} processes on {cores} cores; {why})"


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a list of numbers over processes (float64)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: nn.Module, env: DistEnv, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """DDP: replicate and all-reduce gradients. FSDP (FSDP2 `fully_shard`): shard every block, then the
    root (embedding/lm_head, norms); `param_dtype` enables FSDP's bf16 mixed precision."""
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if env.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
        kw = {"mp_policy": mp} if mp is not None else {}
        blocks = list(getattr(model.transformer, "e", [])) + list(model.transformer.h)
        for block in blocks:
            fully_shard(block, **kw)
            if hasattr(block, "cross_kv"):  # called outside forward by the encoder-decoder
                register_fsdp_forward_method(block, "cross_kv")
        fully_shard(model, **kw)
        return model
    return model


@contextmanager
def no_grad_sync(model: nn.Module, env: DistEnv, skip: bool):
    """Skip the gradient all-reduce for this micro-batch (all but the last of an accumulation)."""
    if not skip:
        yield
    elif env.strategy == "ddp":
        with model.no_sync():
            yield
    elif env.strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with nullcontext():
            yield
