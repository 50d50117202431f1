"""cocomix/files.py: atomic writes, hashes and the run-folder layout, against hashlib and the OS."""

import gc
import hashlib
import os
import subprocess
import sys

from cocomix.checkpoints import list_checkpoints
from cocomix.files import (atomic_write_json, lock_run, atomic_write_text, sha256_file, sha256_json, update_sha256)


def test_sha256_of_a_file_equals_hashlib_across_chunk_boundaries(tmp_path):
    data = os.urandom((1 << 23) + 12345)  # more than one 8 MiB chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert update_sha256(hashlib.sha256(b"prefix"), path).hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()
    assert sha256_json({"b": 1, "a": [2]}) == sha256_json({"a": [2], "b": 1})  # canonical: key order ignored


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_text(path, '{"x": 2}')
    assert path.read_text() == '{"x": 2}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_list_checkpoints_orders_complete_ones_and_skips_interrupted_saves(tmp_path):
    for name, complete in (("step_0000200", True), ("step_0000010", True), ("step_0000300.tmp99", True),
                           ("step_0000400", False)):
        folder = tmp_path / "checkpoints" / name
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.pt").write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000010", "step_0000200"]
    assert list_checkpoints(tmp_path / "missing") == []


PROBE_LOCK = """
import sys
from cocomix.files import RunInUse, lock_run
try:
    lock_run(sys.argv[1]).close()
    print("free")
except RunInUse as e:
    print("held")
"""


def _probe(run_dir):
    out = subprocess.run([sys.executable, "-c", PROBE_LOCK, str(run_dir)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_one_process_may_open_a_run_folder_twice_and_frees_it_with_the_last_holder(tmp_path):
    # Two Trainers on one run folder in one process (a KD test built a teacher and a student there)
    # used to fail on their own lock; another process must still be refused until both are gone.
    run_dir = tmp_path / "run"
    first = lock_run(run_dir)
    second = lock_run(run_dir)
    assert _probe(run_dir) == "held"
    first.close()
    first.close()  # closing twice does not release the other holder's share
    assert _probe(run_dir) == "held"
    del second  # collected: a Trainer built and never trained frees the folder too
    gc.collect()
    assert _probe(run_dir) == "free"
