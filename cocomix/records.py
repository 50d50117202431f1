"""A run's own record, whatever tracker is behind it: metrics.jsonl (append-only, cut back to a
checkpoint's prefix on resume) and the environment (package versions, hardware, git commit) written
to environment.json. Plain files only: the tables read these, never a tracking store."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from cocomix.faults import point
from cocomix.files import atomic_write_bytes, atomic_write_text


class RecordError(RuntimeError):
    """metrics.jsonl is damaged or differs from what a checkpoint recorded (one line)."""


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Besides torch and transformers, the packages that shape a result (tokenisation, data loading,
# evaluation, tracking, sweeps, the DAG, the weights' file format).
RESULT_PACKAGES = ("tokenizers", "datasets", "lm_eval", "mlflow", "wandb", "optuna", "snakemake", "safetensors",
                   "numpy")


def environment_info() -> dict[str, str | int | None]:
    """Versions and hardware, recorded with every run so a log is a reproducible artifact. The GPU
    keys (cuda, cudnn, nccl, driver, gpu_name, gpu_count) are null on a machine without CUDA."""
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
        **gpu_info(),
    }
    for name in RESULT_PACKAGES:  # read from package metadata: importing them would cost seconds
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def gpu_info() -> dict[str, str | int | None]:
    """CUDA, cuDNN and NCCL versions of this torch, the NVIDIA driver's version, and the GPUs' name
    and count; all null without CUDA (a CPU machine)."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": None, "cudnn": None, "nccl": None, "driver": None, "gpu_name": None, "gpu_count": None}
    nccl = None
    try:
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except (AttributeError, RuntimeError):
        pass
    return {"cuda": torch.version.cuda, "cudnn": str(torch.backends.cudnn.version()), "nccl": nccl,
            "driver": nvidia_driver(), "gpu_name": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count()}


def nvidia_driver(proc: str = "/proc/driver/nvidia/version") -> str | None:
    """The NVIDIA kernel driver's version from the driver's own /proc file, None where there is none."""
    import re

    try:
        text = open(proc).read()
    except OSError:
        return None
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def user_name() -> str:
    """Who runs this process (a uid without a passwd entry, as in some containers: its number)."""
    import getpass
    import os

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records past the checkpoint are dropped.

    A checkpoint records the log's size and sha256 at its step (`prefix`); resuming from it keeps
    exactly those bytes, so a line torn by a kill, or anything written after the checkpoint, goes,
    and a log changed or damaged before the checkpoint is a one-line error, not a silent gap."""

    def __init__(self, path: Path):
        self.path = path

    def prefix(self) -> dict[str, Any]:
        """{"bytes", "sha256"} of the log as it is now (what a checkpoint records)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def truncate_to(self, prefix: dict[str, Any], checkpoint: Path) -> None:
        """Keep the first prefix["bytes"] bytes, after checking their sha256 against the checkpoint's record."""
        data = self.path.read_bytes() if self.path.exists() else b""
        head = data[: prefix["bytes"]]
        if len(head) != prefix["bytes"] or hashlib.sha256(head).hexdigest() != prefix["sha256"]:
            raise RecordError(f"{self.path}: its first {prefix['bytes']} bytes differ from what checkpoint "
                                f"{checkpoint} recorded (changed or damaged); restore the file, or move the run "
                                "folder away to start over")
        if len(data) != len(head):
            atomic_write_bytes(self.path, head)

    def truncate_after(self, tokens_seen: int) -> None:
        """Keep the lines up to `tokens_seen` (checkpoints from before `prefix` was recorded)."""
        if not self.path.exists():
            return
        kept = [json.dumps(r) for r in self.read() if r["tokens_seen"] <= tokens_seen]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as fh:
            fh.write(line[: len(line) // 2])
            fh.flush()
            point("metrics.line")  # a kill here leaves a torn last line
            fh.write(line[len(line) // 2 :])

    def read(self) -> list[dict[str, Any]]:
        """The records; a last line torn by a kill (no newline) is left out, any other line that is
        not a JSON record is a one-line error naming the file and line."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "tokens_seen" not in record:
                    raise ValueError("not a metrics record")
                records.append(record)
            except ValueError:
                if i == len(lines):  # the last line and no newline after it: torn by a kill
                    break
                raise RecordError(f"{self.path} line {i}: not a JSON metrics record (damaged); restore the file, "
                                    "or move the run folder away to start over") from None
        return records
