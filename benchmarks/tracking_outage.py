"""A tiny training run with its tracking server down, beside the same run with a working store.

    python benchmarks/tracking_outage.py                   # 3 repeats of each, config/tiny.yaml
    python benchmarks/tracking_outage.py --repeats 1 --tokens 20480

Three stores, each the same `cocomix train` command in a fresh process (wall time, import included):
  working  the default sqlite store
  refused  http://127.0.0.1:<free port>: nothing listens, the connection is refused at once
  silent   a socket that accepts and never answers (a firewall that drops packets): the 3 s probe
The target (issue 16): a run whose server is unreachable finishes within 30 s of its normal time.
Writes benchmarks/results/tracking_outage-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from cocomix.config import load_config  # noqa: E402
from cocomix.data.shards import prepare_data  # noqa: E402

TINY = ["data.synthetic.n_tokens=400000", "tokenizer.vocab_size=512", "model.n_embd=64", "model.n_layer=2",
        "model.n_head=4", "train.block_size=64", "train.global_batch_size=16", "train.micro_batch_size=8",
        "eval.max_blocks=64", "tracking.enabled=true", "concept.insert_layer=1", "sae.layer=1"]


def _train(root: Path, uri: str, tokens: int, i: int) -> float:
    args = [*TINY, f"results_dir={root}", f"data.dir={root / 'data'}", f"train.tokens={tokens}",
            f"eval.every_tokens={tokens // 4}", f"checkpoint.every_tokens={tokens // 2}", f"tracking.uri={uri}",
            f"run_name={uri.split(':')[0]}-{i}-{time.monotonic_ns()}"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cocomix.cli", "train", "--config", str(ROOT / "config/tiny.yaml"),
                           "--no-progress", *args], capture_output=True, text=True, cwd=ROOT)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"tracking_outage: the run with {uri} failed:\n{proc.stderr[-2000:]}")
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=40960, help="training tokens of each run (1024 per step)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as silent, socket.socket() as probe:
        root = Path(tmp)
        prepare_data(load_config(ROOT / "config/tiny.yaml", [*TINY, f"results_dir={root}", f"data.dir={root / 'data'}"]),
                     progress=False)
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        probe.bind(("127.0.0.1", 0))
        refused_port = probe.getsockname()[1]  # bound, never listening: connections are refused
        stores = {"working": f"sqlite:///{root / 'mlflow.db'}", "refused": f"http://127.0.0.1:{refused_port}",
                  "silent": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        _train(root, stores["working"], args.tokens, -1)  # warm-up: the sqlite schema, file caches
        seconds: dict[str, list[float]] = {k: [] for k in stores}
        for i in range(args.repeats):
            for name, uri in stores.items():  # interleaved: drift of the machine hits all three alike
                seconds[name].append(_train(root, uri, args.tokens, i))
                print(f"repeat {i} {name:8s} {seconds[name][-1]:6.1f} s", flush=True)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    extra = {k: median[k] - median["working"] for k in ("refused", "silent")}
    for k, v in extra.items():
        print(f"{k}: median {median[k]:.1f} s vs working {median['working']:.1f} s: {v:+.1f} s "
              f"(target: within 30 s) ratio {median[k] / median['working']:.2f}")
    write_result("tracking_outage", {"tokens": args.tokens, "repeats": args.repeats, "seconds": seconds,
                                     "median_s": median, "extra_s_vs_working": extra,
                                     "within_30_s": all(v < 30 for v in extra.values())}, args.out)


if __name__ == "__main__":
    main()
