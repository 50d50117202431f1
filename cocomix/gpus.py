"""Give each concurrent single-process job its own GPU.

Snakemake's `gpu` resource bounds how many training jobs run at once but does not say which device
each should use. A job therefore claims the first free device itself, with a non-blocking `flock`
on one lock file per device, held for the life of the process (the OS releases it on any exit,
SIGKILL included). When every device is taken it waits. Multi-process jobs (torchrun, SLURM) get
their devices from the launcher and skip this.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

_held: dict[int, object] = {}  # device index -> open lock file, kept (and locked) for the whole process

LOCK_DIR = Path(os.environ.get("COCOMIX_GPU_LOCK_DIR", "/tmp/cocomix-gpu-locks"))


def try_claim(n_devices: int, lock_dir: Path = LOCK_DIR) -> int | None:
    """Lock and return the lowest free device index, or None if all are taken."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_devices):
        fh = open(lock_dir / f"gpu{i}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        _held[i] = fh
        return i
    return None


def claim_device(n_devices: int, lock_dir: Path = LOCK_DIR, poll_s: float = 5.0) -> int:
    """The device this process already holds (a sweep worker trains many trials), else the first free one."""
    if _held:
        return next(iter(_held))
    while True:
        i = try_claim(n_devices, lock_dir)
        if i is not None:
            return i
        time.sleep(poll_s)
