"""Data-parallel runs on PyTorch's own engine: torchrun (or `--devices N`, which starts the same
through torchrun's launcher API), DistributedDataParallel, and a batch norm whose statistics are
taken over the global batch.

The contract, for training: `train.batch_size` is the GLOBAL batch. Every rank draws the same
permutation, crops, flips and attack starts for the whole global batch from the same generator and
keeps its own 1/N slice, so with synchronised batch norm a run on N ranks computes what one
process computes with the same batch size, up to floating-point summation order (and a run can be
resumed on a different number of ranks). Rank 0 alone writes checkpoints, metrics and progress.

A rank that dies takes the others down: the launcher's agent stops the remaining workers and
exits non-zero, and a peer blocked in a collective fails once its connection closes, or at
the latest after `timeout` seconds. The last checkpoint on disk was written atomically by rank 0,
so `weat train --resume RUN_DIR` continues.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import WeatInputError

DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items (sizes differ by at most one)."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))


SINGLE = Context()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Context, str]:
    """Join the process group torchrun set up (env://), if any. Returns the context and the device
    this rank should use: cuda:LOCAL_RANK on GPUs (NCCL), the CPU otherwise (gloo)."""
    if not launched_by_torchrun():
        return SINGLE, device_name
    ctx = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank)
        device_name = f"cuda:{ctx.local_rank}"
    elif device_name.startswith("cuda"):
        raise WeatInputError(f"train.device: {device_name!r} requested but no CUDA device is available; use --device cpu")
    else:
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return ctx, device_name


def shutdown(*, completed: bool = True) -> None:
    """Leave the process group. After a normal finish the ranks first wait for each other, so that
    no rank tears gloo down while a peer still has work in flight (that aborts with "terminate called
    without an active exception"); after a failure nobody waits for a peer that may be gone."""
    if dist.is_available() and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global sums of per-rank 0-d tensors, in one collective. Every rank must hold the same keys."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not sums:
        return dict(sums)
    keys = sorted(sums)
    flat = torch.stack([sums[k].float().reshape(()) for k in keys])
    dist.all_reduce(flat)
    return {k: flat[i] for i, k in enumerate(keys)}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's `obj` (tensors moved to the CPU first), in rank order, on every rank. Only our
    own processes' results travel this way."""
    if not ctx.enabled:
        return [obj]
    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, _to_cpu(obj))
    return parts


def _to_cpu(obj: Any) -> Any:
    import dataclasses

    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- batch norm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks of the incoming gradients (each
    rank's output feeds its own loss, and every rank's input contributed to every output)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the mean and variance over every rank's batch.

    torch's SyncBatchNorm only runs on accelerators; this one uses a differentiable all-reduce of
    the per-channel sums (count, sum, sum of squares), so it works with gloo on the CPU as well.
    Eval mode, and a single process, are plain batch norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device, dtype=torch.float32)
        stats = _AllReduceSum.apply(torch.cat([count, xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3))]))
        c = x.shape[1]
        n, mean = stats[0], stats[1 : 1 + c] / stats[0]
        var = (stats[1 + c :] / n - mean * mean).clamp_min(0.0)  # biased, as batch norm normalises
        with torch.no_grad():
            if self.track_running_stats and self.running_mean is not None:
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by GlobalBatchNorm2d in place, keeping parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(iter(child.state_dict().values())).device)
            setattr(module, name, new)
        else:
            convert_batch_norm(child)
    return module


# ----------------------------------------------------------------------------- launching


def launch(nproc: int, argv: list[str], *, nnodes: int = 1) -> int:
    """Run `python -m weatcli ARGV` on nproc local workers through torchrun's launcher API
    (torch.distributed.launcher.api.elastic_launch, the function behind `torchrun --standalone`).
    Returns the exit code: 0, or 1 when a worker failed (the others are stopped)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=f"weat-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # a failure is reported below, in one line
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "weatcli", *argv)
    except SignalException as e:  # Ctrl-C / SIGTERM: the workers got it too, saved their state and stopped
        print(f"weat: error: interrupted (signal {int(e.sigval)}); the workers were stopped", file=sys.stderr)
        return 130
    except ChildFailedError as e:
        failures = e.failures  # global rank -> ProcessFailure
        if not failures:
            print("weat: error: a worker failed; the other workers were stopped", file=sys.stderr)
            return 1
        rank, first = min(failures.items(), key=lambda kv: kv[1].timestamp)
        if first.exitcode == 2:
            return 2  # bad input: rank 0 has said what was wrong
        how = f"was killed by signal {-first.exitcode}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
        print(f"weat: error: rank {rank} {how}; the other workers were stopped", file=sys.stderr)
        return 1
    finally:
        elastic_log.setLevel(level)
    return 0


def strip_devices_option(argv: list[str]) -> list[str]:
    """argv without `--devices N` / `--devices=N` (what the workers are started with)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--devices":
            skip = True
        elif not a.startswith("--devices="):
            out.append(a)
    return out


def local_batch(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's equal slice of a global batch whose size is a multiple of the world size."""
    if not ctx.enabled:
        return x
    per = len(x) // ctx.world
    return x[ctx.rank * per : (ctx.rank + 1) * per]
