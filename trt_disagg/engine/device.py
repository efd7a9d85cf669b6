"""Where an engine's ranks run, and how they talk: one code path for CPU and CUDA.

    device "cpu"     every rank on the host; TP/PP collectives over gloo on the loopback
    device "cuda"    rank r (= pp_rank * tp + tp_rank, the rank inside its instance) on cuda:r
    device "cuda:N"  rank r on cuda:N+r (several instances on one host each name their first GPU)

On CUDA the collectives are NCCL's: gloo cannot send/recv CUDA tensors between pipeline stages, and a TP
all-reduce through gloo would copy every layer's activations to the host and back; NCCL reduces them on the
GPUs (NVLink where there is one) and rendezvouses through the same FileStore as gloo, so the rank start-up
is unchanged. What crosses the driver's pipes (logits, KV slices) is always a CPU tensor.
"""

from __future__ import annotations

import re

import torch

from trt_disagg.errors import UserError

DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?)$"  # also config.ServerGroup.device's pattern


def rank_device(device: str, rank: int) -> torch.device:
    """The torch device of instance rank `rank` for the deployment's `device` string."""
    if not re.match(DEVICE_PATTERN, device):
        raise UserError(f"device: {device!r} is not cpu, cuda or cuda:N")
    if device == "cpu":
        return torch.device("cpu")
    first = int(device.partition(":")[2] or 0)
    return torch.device("cuda", first + rank)


def check_device(device: str, world_size: int, where: str = "device") -> None:
    """Raise UserError naming `where` unless every one of the `world_size` ranks has its device here."""
    if not re.match(DEVICE_PATTERN, device):
        raise UserError(f"{where}: {device!r} is not cpu, cuda or cuda:N")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise UserError(f"{where}: {device!r} asked for, but torch sees no CUDA device here "
                        f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    last = rank_device(device, world_size - 1)
    count = torch.cuda.device_count()
    if last.index is not None and last.index >= count:
        raise UserError(f"{where}: {device!r} with {world_size} ranks needs cuda:{last.index}, "
                        f"but this host has {count} CUDA device(s)")


def collective_backend(device: str) -> str:
    """torch.distributed backend for the ranks' TP all-reduce and PP send/recv on `device`."""
    return "gloo" if device == "cpu" else "nccl"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
