"""Device, precision and processes: the one place that decides where and in what dtype work runs.

    default_device()              cuda if there is one, else cpu (what SAE training, labelling,
                                  evaluation and inspection use unless told otherwise); TF32 on
    autocast(device, precision)   bf16 autocast on CUDA for "auto"/"bf16", nothing (fp32) otherwise
    setup_distributed()           torchrun's WORLD_SIZE/RANK/LOCAL_RANK -> (Dist, device)
    peak_flops(device)            dense bf16 peak FLOP/s for MFU; None on CPU or an unknown GPU
"""

from __future__ import annotations

import functools
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


# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity), for MFU. Matched by the
# longest name contained in torch.cuda.get_device_name. None: a known device without bf16 tensor cores
# (no MFU, and no warning). Unknown devices get no MFU and a warning rather than a silently wrong number.
PEAK_BF16_FLOPS: dict[str, float | None] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
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
    "V100": None,  # Volta: fp16 tensor cores only
    "T4": None,  # Turing: fp16 only
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # CPUs report no MFU
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak of a device by its CUDA name (see PEAK_BF16_FLOPS)."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # longest match first ("H100 PCIe")
        if key in name:
            return PEAK_BF16_FLOPS[key]
    warnings.warn(f"unknown device {name!r}: no peak-FLOPs entry, MFU will not be reported", stacklevel=2)
    return None


def gpu_utilization(device: torch.device) -> float | None:
    """The percentage of the last sample period in which `device` ran a kernel (NVML, through the
    optional nvidia-ml-py: `pip install cocomix[gpu]`); None on a CPU, without the package or when
    NVML cannot start (no driver). The device is found by its UUID, whatever CUDA_VISIBLE_DEVICES says."""
    if device.type != "cuda":
        return None
    handle = _nvml_handle(device.index if device.index is not None else torch.cuda.current_device())
    if handle is None:
        return None
    import pynvml  # lazy: present, since a handle exists

    try:
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except pynvml.NVMLError:
        return None


@functools.lru_cache(maxsize=None)
def _nvml_handle(index: int):
    """NVML's handle of CUDA device `index`, looked up once (None: no nvidia-ml-py, or NVML cannot start)."""
    try:
        import pynvml  # lazy: an optional extra
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except (pynvml.NVMLError, AttributeError, RuntimeError, AssertionError):
        return None


# ---- Memory pre-flight: refuse a run that cannot fit before anything is allocated ----


def available_memory(device: torch.device, processes_here: int = 1) -> int:
    """Bytes this process may use: free memory of its GPU, or the host's MemAvailable shared by the
    training processes on this host (CPU ranks share one RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        free = info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:  # not Linux: no figure, no check
        return 0
    return free // max(1, processes_here)


@dataclass(frozen=True)
class MemoryEstimate:
    """A lower bound of training memory: fp32 weights, gradients and AdamW's two moments (16 bytes a
    parameter), and per sequence of the micro-batch the activations a GPT block keeps for backward
    (34 d values a token, Korthikanti et al. 2022, without the attention matrix that fused attention
    never stores) plus fp32 logits and their gradient. What it leaves out (the teacher, allocator
    slack, buffers) only makes the real need larger, so a refusal is never a false alarm by this count."""

    params: int
    fixed: int  # bytes independent of the micro-batch
    per_sequence: int  # bytes per sequence of the micro-batch

    def need(self, micro_batch: int) -> int:
        return self.fixed + micro_batch * self.per_sequence

    def largest_micro_batch(self, available: int, per_rank_batch: int) -> int:
        """The largest micro-batch dividing `per_rank_batch` that fits; 0 when none does."""
        fits = [m for m in range(1, per_rank_batch + 1) if per_rank_batch % m == 0 and self.need(m) <= available]
        return max(fits, default=0)


def estimate_training_memory(params: int, n_embd: int, n_layer: int, vocab_size: int, block_size: int,
                             bf16: bool, shards: int = 1, recompute: bool = False) -> MemoryEstimate:
    """`shards`: processes the weights, gradients and AdamW state are split over (train.parallel=fsdp);
    `recompute`: activation checkpointing, which keeps only each block's input (d values a token) and
    recomputes one block at a time in the backward pass."""
    act = 2 if bf16 else 4
    block = 34 * n_embd * act // 2  # one block's saved activations a token (bytes)
    kept = n_layer * n_embd * act + block if recompute else n_layer * block
    per_sequence = block_size * (kept + 2 * 4 * vocab_size)
    return MemoryEstimate(params=params, fixed=-(-16 * params // shards), per_sequence=per_sequence)


def gib(n: int) -> str:
    return f"{n / 2**40:,.1f} TiB" if n >= 2**40 else f"{n / 2**30:,.1f} GiB"
