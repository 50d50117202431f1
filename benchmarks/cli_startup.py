"""CLI start-up on a config typo: how long `cocomix train` takes to refuse a bad key.

    python benchmarks/cli_startup.py                 # 5 runs of each entry point, median reported
    python benchmarks/cli_startup.py --runs 9

The command is `cocomix train --config config/tiny.yaml model.n_embdd=1`, run as the `cocomix`
console script and as `python -m cocomix.cli`. The CLI validates arguments and config before it
imports torch or transformers, so the one-line error should come back in well under a second
(the goal: median < 1 s). Each run's wall time (process start to exit) is printed and the exit
status and error line are checked. The two entry points are timed round-robin so a shared
machine's load hits them alike. Results: benchmarks/results/cli_startup.json (hardware, versions,
commit, date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["train", "--config", "config/tiny.yaml", "model.n_embdd=1"]
EXPECTED = ("cocomix: error: unknown config key 'model.n_embdd' (expected one of: dropout, init_std, "
            "layer_norm_eps, n_embd, n_head, n_layer, n_positions, vocab_multiple, vocab_size)")
GOAL_S = 1.0


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=ROOT).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=ROOT).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def entry_points() -> dict[str, list[str]]:
    points = {}
    script = Path(sys.executable).parent / "cocomix"
    script = str(script) if script.is_file() else shutil.which("cocomix")
    if script:
        points["console_script"] = [script]
    points["python_m"] = [sys.executable, "-m", "cocomix.cli"]
    return points


def run_once(command: list[str], env: dict[str, str]) -> tuple[float, int, list[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(command + ARGS, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    wall = time.perf_counter() - t0
    return wall, proc.returncode, proc.stderr.strip().splitlines()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per entry point")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cli_startup.json"))
    args = ap.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    points = entry_points()
    raw: dict[str, list[float]] = {name: [] for name in points}
    problems = []
    for i in range(args.runs):
        for name, command in points.items():
            wall, code, err = run_once(command, env)
            raw[name].append(wall)
            ok = code != 0 and err == [EXPECTED]
            if not ok:
                problems.append(f"{name} run {i + 1}: exit {code}, stderr {err}")
            print(f"{name:15s} run {i + 1}: {wall:.3f} s  exit {code}{'' if ok else '  UNEXPECTED OUTPUT'}")

    results = {}
    for name, times in raw.items():
        median = statistics.median(times)
        results[name] = {"median_s": median, "min_s": min(times), "max_s": max(times),
                         "under_goal": median < GOAL_S}
        print(f"{name:15s} median {median:.3f} s over {len(times)} runs (goal < {GOAL_S:.1f} s)")

    result = {
        "benchmark": "cli_startup",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "cocomix " + " ".join(ARGS),
        "setup": {"runs": args.runs, "statistic": "median", "goal_s": GOAL_S,
                  "entry_points": {name: " ".join(cmd) for name, cmd in points.items()},
                  "expected_stderr": EXPECTED, "timing": "subprocess wall time, process start to exit"},
        "hardware": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
                     "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "versions": {"python": platform.python_version(), "torch": version("torch"),
                     "transformers": version("transformers"), "pyyaml": version("pyyaml")},
        "commit": git_commit(),
        "results": results,
        "raw_s": raw,
        "problems": problems,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    if problems:
        print("unexpected output:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
