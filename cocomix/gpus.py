"""Give each concurrent job its own GPUs.

Snakemake's `gpu` resource bounds how many GPU jobs run at once but does not say which device each
should use. The CLI therefore claims one device for every GPU subcommand (train, train-sae,
extract-concepts, eval, inspect, steer, a sweep worker) before torch is imported, and narrows
`CUDA_VISIBLE_DEVICES` to it: inside the process the device is always `cuda:0`, and the RNG state a
checkpoint stores is that one device's. A DDP job on one node (`python -m cocomix.launch --gpus N`)
claims its N devices the same way, all or none, before torchrun starts its workers.

The claim is a non-blocking `flock` on one lock file per device, held for the life of the process
(the OS releases it on any exit, SIGKILL included); when the devices are taken the job waits. The
lock folder is shared by every user of the machine (`$TMPDIR/cocomix-gpu-locks`, sticky and
world-writable like /tmp; lock files readable by all, since `flock` needs only a read-only handle),
so two users' jobs never meet on one GPU. Inside a SLURM job the folder is the job's own
(`cocomix-gpu-locks-slurm<jobid>`): SLURM has given the job its devices, which every job on a shared
node numbers from 0. `COCOMIX_GPU_LOCK_DIR` sets the folder. No torch here: the devices are read
from `CUDA_VISIBLE_DEVICES` or the NVIDIA driver's `/proc/driver/nvidia/gpus`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

_held: dict[str, int] = {}  # device id -> open lock file descriptor, kept (and locked) for the whole process

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def lock_dir(env: dict[str, str] | None = None) -> Path:
    """The lock folder: one per machine, or the SLURM job's own inside a SLURM job."""
    env = os.environ if env is None else env
    if env.get("COCOMIX_GPU_LOCK_DIR"):
        return Path(env["COCOMIX_GPU_LOCK_DIR"])
    job = env.get("SLURM_JOB_ID")
    return Path(tempfile.gettempdir()) / (f"cocomix-gpu-locks-slurm{job}" if job else "cocomix-gpu-locks")


def visible_devices(env: dict[str, str] | None = None, proc: Path = NVIDIA_PROC) -> list[str]:
    """The CUDA devices this process may use, as `CUDA_VISIBLE_DEVICES` entries (indices or UUIDs)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if proc.is_dir():
        return [str(i) for i in range(sum(1 for _ in proc.iterdir()))]
    return []


def _shared_folder(folder: Path) -> None:
    """Create the folder as /tmp is (sticky, everyone may add files) if it does not exist."""
    if folder.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(folder, 0o1777)
    except PermissionError:  # another user created it first
        pass


def _open_lock(path: Path) -> int:
    """A read-only handle on the device's lock file, creating it readable by every user. An existing
    file is opened without O_CREAT: in a sticky world-writable folder the kernel may refuse O_CREAT on
    another user's file (fs.protected_regular)."""
    for _ in range(10):
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # another process created it between the two calls
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        return fd
    raise OSError(errno.EAGAIN, f"could not open the GPU lock file {path}")


def _lock(device: str, folder: Path) -> int | None:
    fd = _open_lock(folder / f"gpu-{device.replace('/', '_')}.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def try_claim_many(devices: list[str], n: int, folder: Path | None = None) -> list[str] | None:
    """Lock `n` free devices of `devices` and return them, or lock none and return None."""
    folder = folder or lock_dir()
    _shared_folder(folder)
    got: dict[str, int] = {}
    for device in devices:
        if len(got) == n:
            break
        fd = _lock(device, folder)
        if fd is not None:
            got[device] = fd
    if len(got) < n:
        for fd in got.values():
            os.close(fd)  # all or none: a job holding half its devices could block another forever
        return None
    _held.update(got)
    return list(got)


def try_claim(devices: list[str], folder: Path | None = None) -> str | None:
    """Lock and return the first free device of `devices`, or None if all are taken."""
    got = try_claim_many(devices, 1, folder)
    return got[0] if got else None


def claim_devices(devices: list[str], n: int, folder: Path | None = None, poll_s: float = 5.0) -> list[str]:
    """The devices this process already holds, else `n` free ones (waiting while fewer are free)."""
    if _held:
        return list(_held)[:n]
    while True:
        got = try_claim_many(devices, n, folder)
        if got is not None:
            return got
        time.sleep(poll_s)


def claim_device(devices: list[str], folder: Path | None = None, poll_s: float = 5.0) -> str:
    """The device this process already holds, else the first free one (waiting while all are taken)."""
    return claim_devices(devices, 1, folder, poll_s)[0]


def claim_for_process() -> str | None:
    """One GPU for this process when several are visible and no launcher assigned one: claim it and
    narrow CUDA_VISIBLE_DEVICES to it (before torch initialises CUDA). Returns the device, or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None  # torchrun: the launcher claimed the job's devices, LOCAL_RANK picks one
    devices = visible_devices()
    if len(devices) <= 1:
        return None
    device = claim_device(devices)
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    print(f"cocomix: using GPU {device} of {','.join(devices)} (lock in {lock_dir()})", file=sys.stderr, flush=True)
    return device


def claim_for_job(n: int) -> list[str] | None:
    """The `n` GPUs of a one-node DDP job (cocomix.launch) when more than `n` are visible: claimed all
    at once (waiting until `n` are free) and CUDA_VISIBLE_DEVICES narrowed to them for the workers."""
    devices = visible_devices()
    if len(devices) <= n:
        return None  # the job takes every visible device (or more than exist: torchrun says so)
    got = try_claim_many(devices, n)
    if got is None:
        print(f"cocomix.launch: waiting for {n} free GPUs of {','.join(devices)} (locks in {lock_dir()})",
              file=sys.stderr, flush=True)
        got = claim_devices(devices, n)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(got)
    print(f"cocomix.launch: using GPUs {','.join(got)} of {','.join(devices)} (locks in {lock_dir()})",
          file=sys.stderr, flush=True)
    return got


def local_gpu_slots(env: dict[str, str] | None = None, proc: Path = NVIDIA_PROC) -> int | None:
    """How many GPU jobs a local (not cluster) Snakemake run runs at once by default: every visible
    device. None where none is visible (a CPU machine)."""
    return len(visible_devices(env, proc)) or None
