"""Concept labels (spec 1.2): which SAE latents most influence the teacher's next-token loss,
computed online or once for the whole corpus and cached.

Default (official code): a_t = (∂L/∂h_t · W_dec) ⊙ c_t, with L the mean next-token loss over the
whole block, h_t the teacher's residual stream after block `sae.layer` (the real activation, no
reconstruction spliced in), c_t the post-TopK SAE code; labels = the K_attr largest scores
(signed). Options (`concept.*`): `scoring: attribution_preact` multiplies by the pre-TopK code
c_pre (paper v1, every latent can score), `scoring: activation` takes the top activations (the
paper's ablation), `loss_scope: next_token` differentiates each position's own next-token loss.

Code-vs-paper details (spec 1.2 (i)-(iv)):
* the SAE's de-normalisation factor σ_t in ∂L/∂c_t is dropped as in the code (a positive
  per-token scale: the ranking is unchanged);
* with the post-TopK multiplier only the k active latents can score non-zero; the code's dense
  topk then picks arbitrary zero-score latents when fewer than K_attr are positive. We rank the
  k active latents instead (identical whenever K_attr of them score positive, deterministic
  otherwise);
* the last position of a block has no next token: its labels are -1 and the concept loss
  downstream must ignore it (the code trains on arbitrary labels there).

Cache layout (`cfg.concept_dir`), aligned with `TokenBlocks` (block i of a split = rows
[i*T, (i+1)*T) of its file):

    train.labels.bin, val.labels.bin   (n_blocks, block_size, k_attr) little-endian uint16 when
                                       n_latents < 65535 (65535 = no label), else int32 (-1)
    manifest.json                      written last: what the labels are a function of (data,
                                       teacher and SAE hashes; layer, K_attr, scoring, loss scope,
                                       label precision, block size), the device type, file sizes
                                       and sha256

Precision (`concept.label_precision`, part of the cache key): extraction runs in fp32 by default,
like the official code and the online label path (autocast off, even inside an enclosing autocast
region, and TF32 matmuls off); `tf32` allows TF32 matmuls on CUDA, `bf16` runs under bf16 autocast
(CUDA, or CPU). Labels rank scores that are often nearly equal, so lower precision changes some of
them: `label_agreement` measures how many.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cocomix.config import Config, ConceptConfig, ConfigError
from cocomix.data import DataError
from cocomix.data.shards import TokenBlocks, load_manifest
from cocomix.device import Dist, barrier, setup_distributed
from cocomix.faults import point
from cocomix.files import atomic_write_json, clear_stale_tmp, read_json, sha256_file, sha256_matches_once, sha256_text
from cocomix.model import token_nll
from cocomix.progress import Reporter
from cocomix.sae import load_sae, sae_hash
from cocomix.teacher import load_teacher, run_teacher, teacher_hash

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
STAMP = "labels.verified.json"  # label files whose sha256 matched, and when (see files.sha256_matches_once)
SPLITS = ("train", "val")
NO_LABEL = -1
LABEL_PRECISIONS = ("fp32", "tf32", "bf16")


# --------------------------------------------------------------------------------------
# Attribution and labels
# --------------------------------------------------------------------------------------


def loss_gradient(teacher, input_ids: torch.Tensor, layer: int, loss_scope: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, g): the teacher activation after block `layer` (B, T, d) and ∂L/∂h (B, T, d).

    sequence_mean: L = mean over B and positions 0..T-2 of the next-token loss (code).
    next_token:    g_t = ∂ℓ_t/∂h_t with ℓ_t the loss of predicting token t+1 (paper Eq. 1). Position
                   t also influences later losses through attention, so this needs one backward
                   pass per position (T-1 passes): an option for comparisons, not for scale.
    """
    with torch.enable_grad():
        logits, h = run_teacher(teacher, input_ids, layer)
        losses = token_nll(logits, input_ids)  # (B, T-1)
        if loss_scope == "sequence_mean":
            (g,) = torch.autograd.grad(losses.mean(), h)
        elif loss_scope == "next_token":
            g = torch.zeros_like(h)
            T = input_ids.size(1)
            for t in range(T - 1):  # the B sequences are independent, so one pass serves the batch
                (gt,) = torch.autograd.grad(losses[:, t].sum(), h, retain_graph=t < T - 2)
                g[:, t] = gt[:, t]
        else:
            raise ConfigError(f"config key 'concept.loss_scope': unknown value {loss_scope!r}")
    return h.detach(), g


def attribution_scores(sae, h: torch.Tensor, g: torch.Tensor, scoring: str):
    """Scores and the latent each refers to: (scores (B, T, m), latents (B, T, m)).

    attribution:         m = k, the active latents: (g · W_dec[:, j]) * c_j
    attribution_preact:  m = C, every latent: (g · W_dec[:, j]) * c_pre_j
    activation:          m = k, the top activations c_j
    """
    top_acts, top_indices, info = sae.encode(h)
    if scoring == "activation":
        return top_acts, top_indices
    grad_dict = g.to(sae.W_dec.dtype) @ sae.W_dec  # (B, T, C): ∂L/∂c without the σ_t factor (spec 1.2 iii)
    if scoring == "attribution":
        return torch.gather(grad_dict, -1, top_indices) * top_acts, top_indices
    if scoring == "attribution_preact":
        pre = sae.encode_pre_act(sae.preprocess(h)[0])  # (B, T, C)
        latents = torch.arange(sae.n_latents, device=h.device).expand_as(pre)
        return grad_dict * pre, latents
    raise ConfigError(f"config key 'concept.scoring': unknown value {scoring!r}")


def concept_labels(teacher, sae, input_ids: torch.Tensor, concept: ConceptConfig, layer: int) -> torch.LongTensor:
    """Top-K_attr concept labels of every position: LongTensor (B, T, k_attr), the largest score
    first; -1 at the last position (no next token). Runs the teacher forward (and backward for
    attribution scoring) itself; safe inside `torch.no_grad()`."""
    with torch.no_grad():
        if concept.scoring == "activation":
            _, h = run_teacher(teacher, input_ids, layer, stop_at_layer=True)  # no loss needed
            g = None
        else:
            h, g = loss_gradient(teacher, input_ids, layer, concept.loss_scope)
        scores, latents = attribution_scores(sae, h, g, concept.scoring)
        if concept.k_attr > scores.size(-1):
            raise ConfigError(f"config key 'concept.k_attr': {concept.k_attr} labels from {scores.size(-1)} scored latents")
        best = scores.float().topk(concept.k_attr, dim=-1, sorted=True).indices  # (B, T, k_attr)
        labels = torch.gather(latents, -1, best).long()
        labels[:, -1] = NO_LABEL
    return labels


@contextmanager
def label_precision(device: torch.device, precision: str):
    """The arithmetic of `concept.label_precision` on `device` for the enclosed label computation:
    fp32: autocast off (also inside an enclosing autocast region), TF32 matmuls off;
    tf32: the same with `torch.backends.cuda.matmul.allow_tf32` on (no effect on CPU);
    bf16: bf16 autocast on `device.type` (CUDA or CPU), TF32 off for what autocast leaves in fp32.
    The previous TF32 flag is restored on exit."""
    if precision not in LABEL_PRECISIONS:
        raise ConfigError(f"config key 'concept.label_precision': expected one of {list(LABEL_PRECISIONS)}, "
                          f"got {precision!r}")
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        matmul.allow_tf32 = previous


def label_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far two label sets of the same positions agree, over the positions labelled in both
    (NO_LABEL = -1 elsewhere). `a`, `b`: (..., k) latent indices, the best first. Each figure is in
    [0, 1], 1.0 for identical labels and 0.0 for disjoint ones:

    exact:   fraction of positions whose whole label tuple is identical (same latents, same order);
    top1:    fraction of positions with the same best label;
    overlap: mean over positions of |top-k set of a ∩ that of b| / k (the order ignored).
    """
    if a.shape != b.shape or a.dim() < 1:
        raise ValueError(f"label_agreement: label shapes {tuple(a.shape)} and {tuple(b.shape)} must be equal (..., k)")
    a, b = a.reshape(-1, a.size(-1)), b.reshape(-1, b.size(-1))
    valid = (a >= 0).all(-1) & (b >= 0).all(-1)
    if not valid.any():
        raise ValueError("label_agreement: no position is labelled in both")
    a, b = a[valid], b[valid]
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)  # labels of a that b has too
    return {"exact": (a == b).all(-1).double().mean().item(),
            "top1": (a[:, 0] == b[:, 0]).double().mean().item(),
            "overlap": (shared.double() / a.size(-1)).mean().item()}


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------


def label_dtype(n_latents: int) -> np.dtype:
    return np.dtype("<u2") if n_latents < 65535 else np.dtype("<i4")


def _sentinel(dtype: np.dtype) -> int:
    return 65535 if dtype == np.dtype("<u2") else NO_LABEL


def data_fingerprint(data_dir: Path) -> str:
    """sha256 over the tokenizer hash and every shard's sha256: the token content, not timestamps."""
    m = load_manifest(data_dir, verify=False)
    parts = [m["tokenizer_hash"]] + [
        f"{split}/{s['file']}/{s['sha256']}" for split in sorted(m["splits"]) for s in m["splits"][split]["shards"]
    ]
    return sha256_text("\n".join(parts))


def cache_key(cfg: Config) -> dict:
    """Everything the labels are a function of; a cache is used only when all of it matches."""
    c = cfg.concept
    return {
        "format_version": FORMAT_VERSION,
        "data_sha256": data_fingerprint(cfg.data_dir),
        "teacher_sha256": teacher_hash(cfg),
        "sae_sha256": sae_hash(cfg),
        "layer": cfg.sae.layer,
        "n_latents": cfg.sae.n_latents,
        "block_size": cfg.train.block_size,
        "k_attr": c.k_attr,
        "scoring": c.scoring,
        "loss_scope": c.loss_scope,
        "label_precision": c.label_precision,
    }


class LabelCache:
    """Read access to an extracted label cache, refused unless it was made from the data, teacher,
    SAE and label settings of `cfg`."""

    def __init__(self, cfg: Config):
        self.dir, self.verify = Path(cfg.concept_dir), True
        path = self.dir / MANIFEST
        if not path.is_file():
            raise DataError(f"concept cache {self.dir}: no {MANIFEST} (run `cocomix extract-concepts` first)")
        try:
            self.manifest = read_json(path)
        except ValueError as e:  # not JSON, or bytes that are not UTF-8
            raise DataError(f"{path}: not valid JSON ({e}); re-run `cocomix extract-concepts`") from None
        expected = cache_key(cfg)
        for key, want in expected.items():
            got = self.manifest.get(key)
            if got != want:
                show = (lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v)  # noqa: E731
                raise DataError(f"concept cache {self.dir}: {key} {show(got)!r} does not match {show(want)!r} in use "
                                f"(re-run `cocomix extract-concepts`)")
        self._open()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LabelCache":
        """Open a cache WITHOUT checking it against a config (inspection, benchmarks); training uses
        `LabelCache(cfg)`."""
        self = cls.__new__(cls)
        self.dir, self.verify = Path(folder), False
        self.manifest = read_json(self.dir / MANIFEST)
        self._open()
        return self

    def _open(self) -> None:
        self.k_attr = int(self.manifest["k_attr"])
        self.block_size = int(self.manifest["block_size"])
        dtype = np.dtype(self.manifest["dtype"])
        self._sentinel = _sentinel(dtype)
        self._labels = {}
        for split, entry in self.manifest["splits"].items():
            f = self.dir / entry["file"]
            if not f.is_file() or f.stat().st_size != entry["bytes"]:
                raise DataError(f"concept cache {f}: missing or not {entry['bytes']} bytes (re-run `cocomix extract-concepts`)")
            if self.verify and "sha256" in entry and not sha256_matches_once(f, entry["sha256"], self.dir / STAMP):
                raise DataError(f"concept cache {f}: does not match its sha256 in {self.dir / MANIFEST} (damaged; "
                                "re-run `cocomix extract-concepts`)")
            self._labels[split] = np.memmap(f, dtype=dtype, mode="r").reshape(entry["n_blocks"], self.block_size, self.k_attr)

    def get(self, split: str, block_indices) -> torch.LongTensor:
        """Labels of blocks `block_indices` of `split`: LongTensor (n, block_size, k_attr), -1 = none."""
        if split not in self._labels:
            raise DataError(f"concept cache {self.dir}: no split {split!r}")
        arr = self._labels[split][np.asarray(block_indices, dtype=np.int64)].astype(np.int64)  # (n, T, k_attr)
        arr[arr == self._sentinel] = NO_LABEL
        return torch.from_numpy(arr)


def extract_concepts(cfg: Config, progress: bool = True) -> Path:
    """`cocomix extract-concepts`: labels for every train and val block, written to
    `cfg.concept_dir` in chunks of `concept.extract_batch_size` blocks.

    Resumable: each chunk is appended and fsynced before `progress.json` records it, so a killed run
    restarts at the first unrecorded chunk, and (chunks being fixed batches) the result is
    byte-identical to an uninterrupted run on the same hardware. A finished cache whose key matches
    is left as it is.
    """
    batch_blocks = cfg.concept.extract_batch_size
    if batch_blocks <= 0:
        raise ConfigError(f"config key 'concept.extract_batch_size': must be positive, got {batch_blocks}")
    d, device = setup_distributed()  # under torchrun: one process per GPU, chunks dealt round-robin
    if d.is_main:
        load_manifest(cfg.data_dir, verify=True)  # labels of corrupt shards would be wrong forever
    load_sae(cfg)  # a damaged SAE is one line here, before its changed hash could discard a good cache
    key = cache_key(cfg)
    out = Path(cfg.concept_dir)
    current = [False]
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clear_stale_tmp(out)  # a progress record a killed extraction did not finish
        current[0] = _cache_is_current(cfg, out)
    if d.world_size > 1:
        dist.broadcast_object_list(current, src=0)
    if current[0]:
        return out  # already complete for exactly this key

    dtype = label_dtype(cfg.sae.n_latents)
    label_bytes = _chunk_labeller(cfg, device, dtype)
    row_bytes = cfg.train.block_size * cfg.concept.k_attr * dtype.itemsize  # one block
    state = _resume_state(out, {**key, "extract_batch_size": batch_blocks, "dtype": dtype.str})
    blocks = {s: TokenBlocks(cfg.data_dir, s, cfg.train.block_size, verify=False) for s in SPLITS}
    # A bar on a terminal, else a plain line about every 10% of the blocks (resumed ones count as done).
    done = {s: state["blocks_done"].get(s, 0) for s in SPLITS}
    reporter = Reporter("extract-concepts", sum(len(b) for b in blocks.values()), "block", progress,
                        initial=sum(done.values()))

    def report(split: str, blocks_done: int) -> None:
        if not d.is_main:
            return  # one process reports
        reporter.update(blocks_done - done[split])
        done[split] = blocks_done
        if reporter.due():
            counts = " ".join(f"{s} {done[s]:,}/{len(blocks[s]):,}" for s in SPLITS)
            reporter.line(f"extract-concepts blocks {counts}")

    entries = {}
    for split in SPLITS:
        final = _extract_split(split, blocks[split], out, state, label_bytes, batch_blocks, row_bytes, report, d)
        if d.is_main:
            entries[split] = {"file": final.name, "n_blocks": len(blocks[split]), "bytes": final.stat().st_size,
                              "sha256": sha256_file(final)}
    if not d.is_main:
        barrier(d)  # rank 0 writes the manifest
        return out
    reporter.close()
    manifest = {**key, "dtype": dtype.str, "no_label": _sentinel(dtype), "device": device.type,
                "teacher_path": str(cfg.teacher.path),
                "sae_path": str(cfg.sae.path or cfg.experiment_dir / "sae"), "splits": entries}
    atomic_write_json(out / MANIFEST, manifest, indent=1)  # last: its presence means complete
    (out / PROGRESS).unlink(missing_ok=True)
    barrier(d)
    return out


def _cache_is_current(cfg: Config, out: Path) -> bool:
    """Whether `out` holds a finished cache for exactly `cfg`'s key; a stale manifest is deleted
    first (the cache is then rebuilt)."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        LabelCache(cfg)
        return True
    except DataError:
        (out / MANIFEST).unlink()  # stale: invalidate first, then rebuild
        return False


def _chunk_labeller(cfg: Config, device: torch.device, dtype: np.dtype):
    """Load the teacher and SAE; return a function from token ids (n_chunk, T) to their labels as
    `dtype` bytes, (n_chunk, T, k_attr) row-major, NO_LABEL written as the dtype's sentinel."""
    teacher = load_teacher(cfg, device)
    sae = load_sae(cfg, device)
    if sae.d_model != teacher.config.n_embd:
        raise ConfigError(f"config key 'sae.path': the SAE reads {sae.d_model}-wide activations, the teacher is {teacher.config.n_embd} wide")

    def label_bytes(ids: torch.Tensor) -> bytes:
        ids = ids.to(device)
        with label_precision(device, cfg.concept.label_precision):
            labels = concept_labels(teacher, sae, ids, cfg.concept, cfg.sae.layer)
        arr = labels.cpu().numpy()  # (n_chunk, T, k_attr)
        arr[arr == NO_LABEL] = _sentinel(dtype)
        return arr.astype(dtype).tobytes()  # (n_chunk, T, k_attr) row-major

    return label_bytes


def _resume_state(out: Path, run_key: dict) -> dict:
    """progress.json of an interrupted run with the same `run_key`, else a fresh state."""
    state = {"key": run_key, "blocks_done": {}}
    if (out / PROGRESS).is_file():
        try:
            previous = read_json(out / PROGRESS)
            assert isinstance(previous, dict) and isinstance(previous.get("blocks_done", {}), dict)
        except (ValueError, AssertionError):
            print(f"warning: {out / PROGRESS} is damaged; extracting from the start", file=sys.stderr, flush=True)
            return state
        if previous.get("key") == run_key:
            state = previous
    return state


def _record_progress(out: Path, state: dict, split: str, blocks_done: int) -> None:
    state["blocks_done"][split] = blocks_done
    atomic_write_json(out / PROGRESS, state, indent=1)


def _extract_split(split: str, blocks: TokenBlocks, out: Path, state: dict, label_bytes, batch_blocks: int,
                   row_bytes: int, report, d: Dist = Dist()) -> Path:
    """`<split>.labels.bin` for every block of `split`, resumed after the chunks `state` records:
    chunks are written to a `.partial` file, fsynced, then recorded (and `report(split, blocks
    done)`); the finished file is renamed in place. A split already complete on disk is left as it is.

    On several processes the chunks (the same fixed batches as on one) are dealt round-robin: in each
    round process r labels chunk `round * world_size + r` and writes it at its own offset of the one
    file; after every process fsynced its chunk, rank 0 records the round. The file is byte-identical
    to one process's, and a killed run resumes on any number of processes."""
    n = len(blocks)
    final = out / f"{split}.labels.bin"
    partial = out / f"{split}.labels.bin.partial"
    done = state["blocks_done"].get(split, 0)
    if done == n and final.is_file() and final.stat().st_size == n * row_bytes:
        return final
    if done == n:  # recorded complete but the file is gone: redo this split
        done = 0
    if d.is_main:
        final.unlink(missing_ok=True)
        mode = "r+b" if partial.is_file() and done > 0 else "wb"
        with partial.open(mode) as f:
            f.truncate(done * row_bytes)  # drops a chunk written but not recorded before a kill
    barrier(d)
    stride = batch_blocks * d.world_size  # blocks per round
    with partial.open("r+b") as f:
        for start in range(done, n, stride):
            a = start + d.rank * batch_blocks
            if a < n:
                labels = label_bytes(blocks.get_batch(range(a, min(n, a + batch_blocks))))
                f.seek(a * row_bytes)
                f.write(labels)
                point("labels.chunk")
                f.flush()
                os.fsync(f.fileno())
            barrier(d)  # every chunk of the round is on disk before it is recorded
            if d.is_main:
                _record_progress(out, state, split, min(n, start + stride))
            report(split, min(n, start + stride))
    barrier(d)
    if d.is_main:
        os.replace(partial, final)
        _record_progress(out, state, split, n)
    barrier(d)
    return final
