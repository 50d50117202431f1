"""Device, precision and processes: the one place that decides where and in what dtype work runs.

    default_device()              cuda if there is one, else cpu (what SAE training, labelling,
                                  evaluation and inspection use unless told otherwise); TF32 on
    autocast(device, precision)   bf16 autocast on CUDA for "auto"/"bf16", nothing (fp32) otherwise
    setup_distributed()           torchrun's WORLD_SIZE/RANK/LOCAL_RANK -> (Dist, device)
    peak_flops(device)            dense bf16 peak FLOP/s for MFU; None on CPU or an unknown GPU
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


def default_device() -> torch.device:
    """cuda:0 (the one GPU the CLI claimed for this process, cocomix/gpus.py) if there is one, else cpu."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enable_tf32(device)
    return device


def enable_tf32(device: torch.device) -> None:
    """fp32 matmuls and convolutions on CUDA use TF32 tensor cores (what stays fp32 under bf16
    autocast: the SAE, online labels, the hidden-state ablation, concept metrics). Paths that must
    be full fp32 (cached labels by default) turn it off around themselves."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """`train.precision`: auto means bf16 on CUDA and fp32 elsewhere."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context for `precision` on `device` (a no-op context for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(device, precision) else nullcontext()


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.cuda.is_available():
        return d, torch.device("cpu")
    # torchrun: one device per local rank; a single process: cuda:0, the GPU the CLI claimed for it
    device = torch.device("cuda", d.local_rank)
    torch.cuda.set_device(device)
    enable_tf32(device)
    return d, device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world_size
    return x


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices get no MFU (and a warning) rather
# than a silently wrong number.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is 756e12
    "H100 PCIe": 756e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "A6000": 155e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # CPUs report no MFU
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # longest match first ("H100 PCIe")
        if key in name:
            return PEAK_BF16_FLOPS[key]
    warnings.warn(f"unknown device {name!r}: no peak-FLOPs entry, MFU will not be reported", stacklevel=2)
    return None
