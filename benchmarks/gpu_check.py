"""One command that checks and measures the GPU paths on one device.

    python benchmarks/gpu_check.py                        # on a GPU; sized to fit in 8 minutes on one H200
    python benchmarks/gpu_check.py --device cpu --quick   # the same checks at toy sizes (CI runs this)

1. matmul: the measured dense matmul ceiling (bf16 on CUDA, fp32 on CPU) against the device's peak
   entry (cocomix.device.PEAK_BF16_FLOPS).
2. models: NTP-69M and CoCoMix-69M at the paper's widths (config/paper.yaml scale=69M: NTP 624 wide,
   CoCoMix 512, 8 blocks, T=1024, micro-batch 16, cached labels), eager and torch.compile'd, side by
   side in one process: step time, tokens/s, MFU, peak memory, the CoCoMix/NTP step-time ratio, and
   NTP with the unpadded GPT-2 vocabulary (50257) against the padded default (50304). Each variant
   runs the trainer's own `train_step` (bf16 autocast on CUDA, fused AdamW).
3. stages: the CLI on `.test/config.yaml` on this device: prepare-data; the teacher, killed with
   SIGKILL after its first checkpoint and rerun (it must resume); train-sae; extract-concepts;
   CoCoMix trained on the cached labels; eval.
4. labels: the cache extract-concepts wrote against labels recomputed online (fp32) for the same
   blocks, and bf16 extraction against fp32 (`cocomix.concepts.label_agreement`).
5. collectives: all-reduce over every GPU it sees (NCCL; on CPU 2 gloo processes), one process per
   device under torchrun: each sum checked exactly, bus bandwidth per message size (nccl-tests'
   convention: 2 (n-1)/n x bytes / time).
6. memory: one training step (the trainer's `train_step`, bf16 autocast, fused AdamW) of NTP and
   CoCoMix at the paper's 386M and 1.38B widths on one device: peak memory against the trainer's
   pre-flight lower bound (`cocomix.device.estimate_training_memory`); --quick: toy widths.

Writes benchmarks/results/gpu_check-<device>-<date>.json (hardware, versions, commit, date) and
exits 1 when a check failed (each failure is one line in the JSON and on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import make_train_step, write_result  # noqa: E402
from cocomix.config import load_config  # noqa: E402
from cocomix.device import autocast, peak_flops, sync  # noqa: E402
from cocomix.checkpoints import list_checkpoints  # noqa: E402
from cocomix.methods import Batch, get_method  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------
# 1. matmul ceiling
# ---------------------------------------------------------------------------------------------


def matmul_ceiling(device: torch.device, quick: bool) -> dict:
    n = 512 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 5 if quick else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    flops = 2 * n**3 * reps / (time.perf_counter() - t0)
    peak = peak_flops(device)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": flops, "peak_entry": peak,
            "fraction_of_peak": flops / peak if peak else None}


# ---------------------------------------------------------------------------------------------
# 2. NTP and CoCoMix at the paper's 69M widths
# ---------------------------------------------------------------------------------------------


def model_config(method: str, quick: bool, extra: list[str]):
    overrides = [f"method={method}", "scale=69M", *extra]
    if quick:  # the same code at toy size: 2 blocks, 64 wide, T=64 (the GPT-2 vocabulary stays)
        width = "model.n_embd=64" if method == "ntp" else "model.n_embd=48"
        overrides += [width, "model.n_layer=2", "model.n_head=4", "train.block_size=64", "concept.insert_layer=1",
                      "sae.n_latents=512", "sae.k=8", "concept.k=8"]
    return load_config(ROOT / "config/paper.yaml", overrides)


def measure_model(cfg, device, compile_: bool, micro_batch: int, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    method = get_method(cfg.method)
    method.cfg = cfg  # what setup() gives a run with cached labels (no teacher needed)
    model = method.build_model(cfg, 50257, 50256).to(device)
    vocab, T = model.config.vocab_size, cfg.train.block_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    extras = {}
    if cfg.method == "cocomix":  # cached labels: random latents in the cache's layout
        extras["concept_labels"] = torch.randint(0, cfg.sae.n_latents, (micro_batch, T, cfg.concept.k_attr), generator=gen)
    batch = Batch(torch.randint(0, 50257, (micro_batch, T), generator=gen), extras).to(device)
    forward = torch.compile(model) if compile_ else model
    step = make_train_step(method, model, batch, opt, autocast(device, cfg.train.precision), forward=forward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):  # compilation happens here
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        result = step()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    tok_s = micro_batch * T / seconds
    peak, fpt = peak_flops(device), model.flops_per_token(T)
    return {"method": cfg.method, "compile": compile_, "n_embd": cfg.model.n_embd, "n_layer": cfg.model.n_layer,
            "vocab": vocab, "micro_batch": micro_batch, "block_size": T, "params": model.num_params(),
            "flops_per_token": fpt, "warmup_s": warm_s, "step_ms": 1000 * seconds, "tokens_per_s": tok_s,
            "mfu": tok_s * fpt / peak if peak else None, "loss": float(result.loss),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def models(device: torch.device, quick: bool) -> dict:
    micro, warmup, steps = (2, 1, 2) if quick else (16, 3, 10)
    rows = {}
    vocab_mode = "eager" if quick else "compiled"  # --quick: one compile fewer (CI time)
    for name, method, compile_, extra in (("ntp_eager", "ntp", False, []), ("ntp_compiled", "ntp", True, []),
                                          (f"ntp_vocab50257_{vocab_mode}", "ntp", not quick, ["model.vocab_multiple=1"]),
                                          ("cocomix_eager", "cocomix", False, []),
                                          ("cocomix_compiled", "cocomix", True, [])):
        cfg = model_config(method, quick, extra)
        rows[name] = r = measure_model(cfg, device, compile_, micro, warmup, steps)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{name:>26}: {r['step_ms']:9.1f} ms/step {r['tokens_per_s']:>12,.0f} tok/s  MFU {mfu}  "
              f"vocab {r['vocab']}  loss {r['loss']:.3f}", flush=True)
    ratios = {"cocomix_over_ntp_step_time_eager": rows["cocomix_eager"]["step_ms"] / rows["ntp_eager"]["step_ms"],
              "cocomix_over_ntp_step_time_compiled": rows["cocomix_compiled"]["step_ms"] / rows["ntp_compiled"]["step_ms"],
              f"vocab50257_over_50304_step_time_{vocab_mode}":
                  rows[f"ntp_vocab50257_{vocab_mode}"]["step_ms"] / rows[f"ntp_{vocab_mode}"]["step_ms"],
              "compiled_over_eager_tokens_per_s_ntp": rows["ntp_compiled"]["tokens_per_s"] / rows["ntp_eager"]["tokens_per_s"]}
    for k, v in ratios.items():
        print(f"{k:>42}: {v:.3f}", flush=True)
    return {"variants": rows, "ratios": ratios}


# ---------------------------------------------------------------------------------------------
# 3. the CLI stages of .test/config.yaml, with a kill and a resume
# ---------------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cocomix.cli", *args]


def _run(cmd: list[str], log: Path, env=ENV, timeout: float = 900) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{' '.join(cmd[2:4])} exited {proc.returncode}: {tail[0]}")
    return time.perf_counter() - t0


def stage_overrides(work: Path, quick: bool) -> list[str]:
    base = [f"results_dir={work}", "tracking.enabled=false"]
    if quick:
        return base + ["data.synthetic.n_tokens=120000", "sae.tokens=60000", "sae.dead_after_tokens=30000",
                       "eval.ppl_max_blocks=16", "eval.synthetic_docs=10"]
    return base


def stages(device: torch.device, quick: bool, work: Path) -> dict:
    from cocomix.dag import Dag

    config = ROOT / ".test/config.yaml"
    plan = Dag(config)
    common = stage_overrides(work, quick)
    env = {**ENV, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")} if device.type == "cuda" \
        else {**ENV, "CUDA_VISIBLE_DEVICES": ""}
    log, seconds = work / "stages.log", {}
    cfg_arg = ["--config", str(config)]
    seconds["prepare_data"] = _run(_cli("prepare-data", *cfg_arg, *common), log, env)

    # The teacher, long enough on a GPU that the kill lands mid-run: SIGKILL after its first checkpoint.
    teacher = list(plan.spec("teacher").overrides) + common + (
        [] if quick else ["train.tokens=1048576", "checkpoint.every_tokens=65536"])
    run_dir = load_config(config, teacher).run_dir
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.Popen(_cli("train", *cfg_arg, "--no-progress", *teacher), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
        while proc.poll() is None and not list_checkpoints(run_dir):  # complete checkpoints only
            time.sleep(0.02)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    if not killed:
        raise RuntimeError("teacher finished before its first checkpoint could be killed: nothing resumed")
    _run(_cli("train", *cfg_arg, "--no-progress", *teacher), log, env)
    seconds["train_teacher_killed_and_resumed"] = time.perf_counter() - t0
    resumed = "resumed from" in log.read_text()  # the rerun's start line
    if not resumed:
        raise RuntimeError("the rerun of the killed teacher did not resume from its checkpoint")

    seconds["train_sae"] = _run(_cli("train-sae", *cfg_arg, "--no-progress", *common), log, env)
    variant = next(v for v in plan.label_specs if v.startswith("attribution"))
    label_overrides = list(plan.label_specs[variant].overrides) + common
    seconds["extract_concepts"] = _run(_cli("extract-concepts", *cfg_arg, "--no-progress", *label_overrides), log, env)
    student = list(plan.spec("cocomix-base-s0").overrides) + common
    seconds["train_cocomix"] = _run(_cli("train", *cfg_arg, "--no-progress", *student), log, env)
    student_dir = load_config(config, student).run_dir
    seconds["eval"] = _run(_cli("eval", "--no-progress", str(student_dir)), log, env)
    for name, s in seconds.items():
        print(f"{name:>34}: {s:7.1f} s", flush=True)
    return {"seconds": seconds, "resumed": resumed, "label_overrides": label_overrides}


# ---------------------------------------------------------------------------------------------
# 4. cached against online labels
# ---------------------------------------------------------------------------------------------


def labels(device: torch.device, quick: bool, label_overrides: list[str]) -> dict:
    from cocomix.concepts import LabelCache, concept_labels, label_agreement, label_precision
    from cocomix.data.shards import TokenBlocks
    from cocomix.sae import load_sae
    from cocomix.teacher import load_teacher

    cfg = load_config(ROOT / ".test/config.yaml", label_overrides)
    teacher = load_teacher(cfg, device).eval().requires_grad_(False)
    sae = load_sae(cfg, device).eval().requires_grad_(False)
    cache = LabelCache(cfg)
    blocks = TokenBlocks(cfg.data_dir, "train", cfg.train.block_size)
    idx = list(range(min(len(blocks), 16 if quick else 256)))
    ids = blocks.get_batch(idx).to(device)
    cached = cache.get("train", idx).to(device)
    out = {}
    for precision in ("fp32", "bf16"):
        with torch.enable_grad(), label_precision(device, precision):
            labels_now = concept_labels(teacher, sae, ids, cfg.concept, cfg.sae.layer)
        out[f"cached_vs_online_{precision}"] = agreement = label_agreement(cached.long(), labels_now.long())
        print(f"{'cached vs online ' + precision:>34}: " + ", ".join(f"{k} {v:.4f}" for k, v in agreement.items()),
              flush=True)
    out["blocks"] = len(idx)
    return out


# ---------------------------------------------------------------------------------------------
# 5. all-reduce over the devices
# ---------------------------------------------------------------------------------------------

ALL_REDUCE = r"""
import json, os, sys, time, torch, torch.distributed as dist
cuda = torch.cuda.is_available() and os.environ.get("CHECK_DEVICE") == "cuda"
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
rows = []
for mib in json.loads(os.environ["CHECK_SIZES"]):
    n = mib * 2**20 // 4
    x = torch.full((n,), float(rank + 1), device=device)
    dist.all_reduce(x)  # warm-up, and the exact check: 1 + 2 + ... + world
    ok = bool((x == world * (world + 1) / 2).all())
    reps = 3 if n < 2**22 else 2
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(x)
    if cuda:
        torch.cuda.synchronize(device)
    s = (time.perf_counter() - t0) / reps
    rows.append({"mib": mib, "exact": ok, "ms": 1000 * s, "bus_gb_s": 2 * (world - 1) / world * n * 4 / s / 1e9})
if rank == 0:
    print("RESULT " + json.dumps({"world": world, "backend": dist.get_backend(), "sizes": rows}))
dist.destroy_process_group()
"""


def collectives(device: torch.device, quick: bool, work: Path) -> dict:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 2
    if gpus < 2:
        return {"world": gpus, "skipped": "one GPU visible: no all-reduce to check"}
    script = work / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    sizes = [1, 16] if quick else [1, 16, 256, 1024]
    env = {**ENV, "CHECK_DEVICE": device.type, "CHECK_SIZES": str(sizes), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                           str(script)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"all-reduce over {gpus} processes exited {proc.returncode}: "
                           f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for row in result["sizes"]:
        print(f"{'all-reduce ' + str(row['mib']) + ' MiB':>34}: {row['ms']:8.2f} ms  bus {row['bus_gb_s']:7.2f} GB/s  "
              f"exact {row['exact']}", flush=True)
    if not all(row["exact"] for row in result["sizes"]):
        raise RuntimeError(f"all-reduce over {gpus} processes gave a wrong sum")
    return result


# ---------------------------------------------------------------------------------------------
# 6. one training step's memory at 386M and 1.38B
# ---------------------------------------------------------------------------------------------


def memory(device: torch.device, quick: bool) -> dict:
    from cocomix.device import estimate_training_memory

    rows = {}
    for scale in ("386M", "1.38B"):
        for method in ("ntp", "cocomix"):
            extra = [f"scale={scale}"]
            cfg = model_config(method, quick, extra) if quick else load_config(
                ROOT / "config/paper.yaml", [f"method={method}", *extra])
            micro = 1 if quick else cfg.train.micro_batch_size
            r = measure_model(cfg, device, False, micro, 1, 1)
            m = cfg.model
            est = estimate_training_memory(r["params"], m.n_embd, m.n_layer, r["vocab"], cfg.train.block_size,
                                           device.type == "cuda")
            r["lower_bound_gb"] = est.need(micro) / 2**30
            rows[f"{method}_{scale}"] = r
            got = f"{r['peak_memory_gb']:.1f} GiB" if r["peak_memory_gb"] is not None else "n/a (CPU)"
            print(f"{method + ' ' + scale + ' step memory':>34}: {got}  lower bound {r['lower_bound_gb']:.1f} GiB  "
                  f"micro-batch {micro}  {r['step_ms']:.0f} ms", flush=True)
            if r["peak_memory_gb"] is not None and r["peak_memory_gb"] < r["lower_bound_gb"]:
                raise RuntimeError(f"{method} {scale}: peak {r['peak_memory_gb']:.1f} GiB below the pre-flight "
                                   f"lower bound {r['lower_bound_gb']:.1f} GiB (the estimate is wrong)")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="toy sizes (CPU, CI): the same code paths in about a minute")
    ap.add_argument("--only", nargs="*", default=None,
                    choices=["matmul", "models", "stages", "labels", "collectives", "memory"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    body: dict = {"device_type": device.type, "quick": args.quick, "failures": []}
    wanted = args.only or ["matmul", "models", "stages", "labels", "collectives", "memory"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        for name, fn in (("matmul", lambda: matmul_ceiling(device, args.quick)),
                         ("models", lambda: models(device, args.quick)),
                         ("stages", lambda: stages(device, args.quick, work)),
                         ("labels", lambda: labels(device, args.quick, body["stages"]["label_overrides"])),
                         ("collectives", lambda: collectives(device, args.quick, work)),
                         ("memory", lambda: memory(device, args.quick))):
            if name not in wanted or (name == "labels" and "stages" not in body):
                continue
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                body[name] = fn()
            except Exception as e:  # one failed check must not hide the others' measurements
                line = f"{name}: {type(e).__name__}: {e}".splitlines()[0]
                body["failures"].append(line)
                print(f"gpu_check: FAILED {line}", file=sys.stderr, flush=True)
                traceback.print_exc(limit=3, file=sys.stderr)
            body.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
    body["total_seconds"] = time.perf_counter() - started
    write_result("gpu_check", body, args.out)
    print(f"gpu_check: {'FAILED ' + str(len(body['failures'])) if body['failures'] else 'passed'} "
          f"in {body['total_seconds']:.0f} s", flush=True)
    return 1 if body["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
