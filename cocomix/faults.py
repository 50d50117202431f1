"""Fault points: where the fault-injection suite (tests/test_faults.py) kills a process.

`point(site)` does nothing unless the environment variable COCOMIX_FAULTS names a plan file: a JSON
list of {"site": ..., "hit": n}. Only the first entry is armed. The n-th time a process passes that
site, the entry is removed from the plan (under a lock, so it fires once whatever the number of
processes) and the process SIGKILLs itself: what an OOM kill, a power cut or a preempted SLURM job
does at that exact place. Rerunning the same command until the plan is empty is then a chain of
crashes and recoveries, each at a known place.

Sites (each named where it is called):
  train.step                after an optimizer step, before its metrics are logged
  metrics.line              half of a metrics.jsonl line written (a torn write)
  checkpoint.<file>         a checkpoint's temporary folder holds <file> and what comes before it
  checkpoint.renamed        a checkpoint in place, older ones not pruned yet
  write:<name>              an atomic write of <name>: the temporary file complete, not renamed yet
  labels.chunk              a chunk of concept labels appended, not fsynced or recorded
  sae.step                  an SAE optimizer step
  sae.swap                  the old SAE folder moved aside, the new one not in place yet
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

ENV = "COCOMIX_FAULTS"
_hits: dict[str, int] = {}


def point(site: str) -> None:
    plan = os.environ.get(ENV)
    if not plan:
        return
    _hits[site] = n = _hits.get(site, 0) + 1
    path = Path(plan)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = json.loads(path.read_text()) if path.is_file() else []
        if not entries or entries[0]["site"] != site or entries[0]["hit"] != n:
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(entries[1:]))
        os.replace(tmp, path)
    os.kill(os.getpid(), signal.SIGKILL)
