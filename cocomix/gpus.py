"""Give each concurrent single-process job its own GPU.

Snakemake's `gpu` resource bounds how many GPU jobs run at once but does not say which device each
should use. The CLI therefore claims one device for every GPU subcommand (train, train-sae,
extract-concepts, eval, inspect, steer, a sweep worker) before torch is imported, and narrows
`CUDA_VISIBLE_DEVICES` to it: inside the process the device is always `cuda:0`, and the RNG state a
checkpoint stores is that one device's. The claim is a non-blocking `flock` on one lock file per
device, held for the life of the process (the OS releases it on any exit, SIGKILL included); when
every device is taken the job waits. Lock files live in a folder per user
(`$TMPDIR/cocomix-gpu-locks-<uid>`, or `COCOMIX_GPU_LOCK_DIR`), so a second user never meets
another's files. Multi-process jobs (torchrun, SLURM) get their devices from the launcher and skip
this. No torch here: the devices are read from `CUDA_VISIBLE_DEVICES` or the NVIDIA driver's
`/proc/driver/nvidia/gpus`.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

_held: dict[str, object] = {}  # device id -> open lock file, kept (and locked) for the whole process

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def lock_dir() -> Path:
    """This user's lock folder."""
    if os.environ.get("COCOMIX_GPU_LOCK_DIR"):
        return Path(os.environ["COCOMIX_GPU_LOCK_DIR"])
    return Path(tempfile.gettempdir()) / f"cocomix-gpu-locks-{os.getuid()}"


def visible_devices(env: dict[str, str] | None = None, proc: Path = NVIDIA_PROC) -> list[str]:
    """The CUDA devices this process may use, as `CUDA_VISIBLE_DEVICES` entries (indices or UUIDs)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if proc.is_dir():
        return [str(i) for i in range(sum(1 for _ in proc.iterdir()))]
    return []


def try_claim(devices: list[str], folder: Path | None = None) -> str | None:
    """Lock and return the first free device of `devices`, or None if all are taken."""
    folder = folder or lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for device in devices:
        fh = open(folder / f"gpu-{device.replace('/', '_')}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        _held[device] = fh
        return device
    return None


def claim_device(devices: list[str], folder: Path | None = None, poll_s: float = 5.0) -> str:
    """The device this process already holds, else the first free one (waiting while all are taken)."""
    if _held:
        return next(iter(_held))
    while True:
        device = try_claim(devices, folder)
        if device is not None:
            return device
        time.sleep(poll_s)


def claim_for_process() -> str | None:
    """One GPU for this process when several are visible and no launcher assigned one: claim it and
    narrow CUDA_VISIBLE_DEVICES to it (before torch initialises CUDA). Returns the device, or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None  # torchrun: LOCAL_RANK picks the device
    devices = visible_devices()
    if len(devices) <= 1:
        return None
    device = claim_device(devices)
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    print(f"cocomix: using GPU {device} of {','.join(devices)} (lock in {lock_dir()})", file=sys.stderr, flush=True)
    return device
