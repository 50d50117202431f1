"""Concept labels: attribution against autograd-through-the-SAE and finite differences, the
paper's options, the label cache (exact resume after SIGKILL, refusal of a mismatched cache) and the
precision of extraction (fp32 by default; bf16 measured against it)."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import numpy as np

from cocomix.concepts import (LabelCache, _chunk_labeller, attribution_scores, concept_labels, extract_concepts,
                              label_agreement, label_dtype, label_precision, loss_gradient)
from cocomix.config import Config, ConfigError, load_config
from cocomix.data import DataError
from cocomix.data.shards import TokenBlocks, prepare_data
from cocomix.sae import init_sae, load_sae, save_sae
from cocomix.teacher import load_teacher, run_teacher
from conftest import ROOT, cli, tiny_overrides

LAYER, C, K, K_ATTR = 1, 256, 8, 4
SIZES = [f"sae.n_latents={C}", f"sae.k={K}", f"concept.k={K}", f"concept.k_attr={K_ATTR}"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_data, tiny_teacher):
    """float64 copies of the tiny teacher and a random-direction SAE (labels only need a dictionary)."""
    root = tmp_path_factory.mktemp("attr")
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(root, tiny_data, f"teacher.path={tiny_teacher}", *SIZES))
    teacher = load_teacher(cfg).double()
    blocks = TokenBlocks(tiny_data, "val", cfg.train.block_size)
    ids = blocks.get_batch([0, 1])  # (2, 64)
    _, h = run_teacher(teacher, ids, LAYER, stop_at_layer=True)
    sae = init_sae(cfg, teacher.config.n_embd, h.reshape(-1, h.size(-1)).float(), seed=0).double().requires_grad_(False)
    with torch.no_grad():
        sae.latent_bias.normal_(0, 0.5)  # so that some top-k pre-activations are negative (ReLU -> 0)
    return cfg, teacher, sae, ids


def _loss(logits, ids):
    """The teacher's sequence-mean next-token loss, written out independently."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def test_attribution_matches_autograd_through_sae_and_finite_differences(setup):
    cfg, teacher, sae, ids = setup
    h, g = loss_gradient(teacher, ids, LAYER, "sequence_mean")
    scores, latents = attribution_scores(sae, h, g, "attribution")  # (B, T, k)
    B, T = ids.shape
    dense = torch.zeros(B, T, C, dtype=torch.float64).scatter(-1, latents, scores)

    # Reference: splice the SAE decode into the teacher with the value of the real activation
    # (h + x̂(c) - x̂(c).detach()), so ∂L/∂c = σ_t W_decᵀ ∂L/∂h_t; spec 1.2 drops σ_t.
    top_acts, top_indices, info = sae.encode(h)
    c = torch.zeros(B, T, C, dtype=torch.float64).scatter(-1, top_indices, top_acts).requires_grad_(True)
    x_hat = (c @ sae.W_dec.T + sae.pre_bias) * info["std"] + info["mu"]
    with torch.enable_grad():
        logits, _ = run_teacher(teacher, ids, LAYER, edit=lambda hh: hh + x_hat - x_hat.detach())
        (grad_c,) = torch.autograd.grad(_loss(logits, ids), c)
    reference = grad_c * c.detach() / info["std"]
    torch.testing.assert_close(dense, reference, rtol=0, atol=1e-5)
    assert dense.abs().max() > 1e-4  # not trivially zero
    assert (dense[:, -1] == 0).all()  # the last position has no next-token loss

    # Finite differences of the loss in c on a few active entries (c_j -> c_j ± eps moves h by ± eps σ W_dec[:, j]).
    eps = 1e-5
    for b, t, slot in [(0, 3, 0), (1, 20, 1), (0, 50, 2)]:
        j = int(top_indices[b, t, slot])
        direction = torch.zeros_like(h)
        direction[b, t] = info["std"][b, t] * sae.W_dec[:, j]
        with torch.no_grad():
            plus = _loss(run_teacher(teacher, ids, LAYER, edit=lambda hh: hh + eps * direction)[0], ids)
            minus = _loss(run_teacher(teacher, ids, LAYER, edit=lambda hh: hh - eps * direction)[0], ids)
        fd = (plus - minus) / (2 * eps) * c[b, t, j].detach() / info["std"][b, t, 0]
        torch.testing.assert_close(dense[b, t, j], fd, rtol=1e-5, atol=1e-9)

    # Labels: the K_attr best of those scores (signed), -1 where there is no next token.
    labels = concept_labels(teacher, sae, ids, cfg.concept, LAYER)
    active_ref = torch.gather(reference, -1, top_indices)
    want = torch.gather(top_indices, -1, active_ref.topk(K_ATTR, dim=-1).indices)
    assert labels.shape == (B, T, K_ATTR) and labels.dtype == torch.long
    assert torch.equal(labels[:, :-1], want[:, :-1])
    assert (labels[:, -1] == -1).all()


def test_next_token_scope_matches_prefix_reference(setup):
    cfg, teacher, sae, ids = setup
    ids = ids[:, :24]  # one backward pass per position: keep it short
    _, g = loss_gradient(teacher, ids, LAYER, "next_token")
    for t in (0, 9, 22):
        # Causality: ℓ_t depends only on tokens <= t+1, so a prefix run gives the same ℓ_t.
        prefix = ids[:, : t + 2]
        with torch.enable_grad():
            logits, h = run_teacher(teacher, prefix, LAYER)
            (gp,) = torch.autograd.grad(F.cross_entropy(logits[:, t], prefix[:, t + 1], reduction="sum"), h)
        torch.testing.assert_close(g[:, t], gp[:, t], rtol=1e-7, atol=1e-12)
    assert (g[:, -1] == 0).all()


def test_preact_and_activation_scoring(setup):
    cfg, teacher, sae, ids = setup
    h, g = loss_gradient(teacher, ids, LAYER, "sequence_mean")
    mu = h.mean(-1, keepdim=True)
    sigma = (h - mu).pow(2).sum(-1, keepdim=True).div(h.size(-1) - 1).sqrt()
    c_pre = ((h - mu) / (sigma + 1e-5) - sae.pre_bias) @ sae.encoder.weight.T + sae.latent_bias  # (B, T, C)

    preact = concept_labels(teacher, sae, ids, dataclasses.replace(cfg.concept, scoring="attribution_preact"), LAYER)
    want = ((g @ sae.W_dec) * c_pre).topk(K_ATTR, dim=-1).indices
    assert torch.equal(preact[:, :-1], want[:, :-1])
    # Unlike the post-TopK form, the pre-activation form can pick latents outside the top k.
    top_k = c_pre.topk(K, dim=-1).indices
    outside = ~(preact[:, :-1, :, None] == top_k[:, :-1, None, :]).any(-1)
    assert outside.any()

    act = concept_labels(teacher, sae, ids, dataclasses.replace(cfg.concept, scoring="activation"), LAYER)
    assert torch.equal(act[:, :-1], c_pre.topk(K_ATTR, dim=-1).indices[:, :-1])
    assert (act[:, -1] == -1).all()


# ---- the cache ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_data, tiny_teacher):
    """A small corpus with the tiny corpus's tokenizer (so the teacher fits it) and a saved SAE."""
    root = tmp_path_factory.mktemp("cache")
    base = [f"teacher.path={tiny_teacher}", *SIZES, "data.synthetic.n_tokens=12000", "data.synthetic.seed=7",
            f"tokenizer.path={tiny_data / 'tokenizer'}", "concept.extract_batch_size=8"]
    overrides = tiny_overrides(root, root / "data", *base)
    cfg = load_config(ROOT / "config/tiny.yaml", overrides)
    prepare_data(cfg, progress=False)
    teacher = load_teacher(cfg)
    ids = TokenBlocks(cfg.data_dir, "train", cfg.train.block_size).get_batch(range(8))
    _, h = run_teacher(teacher, ids, LAYER, stop_at_layer=True)
    sae = init_sae(cfg, teacher.config.n_embd, h.reshape(-1, h.size(-1)), seed=3)
    save_sae(sae, cfg.experiment_dir / "sae", {"layer": LAYER})
    return cfg, overrides


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_extraction_killed_and_rerun_is_byte_identical(small):
    cfg, overrides = small
    clean_dir = cfg.experiment_dir / "concepts_clean"
    clean_cfg = load_config(ROOT / "config/tiny.yaml", overrides + [f"concept.cache_dir={clean_dir}"])
    extract_concepts(clean_cfg, progress=False)
    n_train = len(TokenBlocks(cfg.data_dir, "train", cfg.train.block_size))
    assert n_train >= 48  # enough chunks of 8 to kill in the middle

    killed_dir = cfg.experiment_dir / "concepts_killed"
    cmd = cli("extract-concepts", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress",
              *overrides, f"concept.cache_dir={killed_dir}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress, done = killed_dir / "progress.json", 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.loads(progress.read_text())["blocks_done"].get("train", 0)
        except (OSError, ValueError):
            done = 0
        if done >= 16:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 16 <= done < n_train, f"not killed mid-way (train blocks done: {done} of {n_train})"
    assert not (killed_dir / "manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not (killed_dir / "progress.json").exists()
    clean, resumed = _files(clean_dir), _files(killed_dir)
    assert sorted(resumed) == ["manifest.json", "train.labels.bin", "val.labels.bin"]
    assert resumed == clean  # every byte, labels and manifest

    # The cache holds what online extraction computes, in the documented layout.
    cache = LabelCache(clean_cfg)
    manifest = json.loads(clean["manifest.json"])
    assert manifest["dtype"] == "<u2" and cache.k_attr == K_ATTR
    assert manifest["label_precision"] == "fp32" and manifest["device"] == "cpu"
    assert len(clean["train.labels.bin"]) == n_train * cfg.train.block_size * K_ATTR * 2
    teacher, sae = load_teacher(clean_cfg), load_sae(clean_cfg)
    for split in ("train", "val"):
        blocks = TokenBlocks(cfg.data_dir, split, cfg.train.block_size)
        idx = list(range(8))  # the first extraction chunk: the same batch as online
        online = concept_labels(teacher, sae, blocks.get_batch(idx), clean_cfg.concept, LAYER)
        assert torch.equal(cache.get(split, idx), online)
    got = cache.get("train", [5, 1])
    assert got.shape == (2, cfg.train.block_size, K_ATTR) and got.dtype == torch.long
    assert (got[:, -1] == -1).all() and ((got[:, :-1] >= 0) & (got[:, :-1] < C)).all()


def test_mismatched_cache_is_refused(small):
    cfg, overrides = small
    cache_dir = cfg.experiment_dir / "concepts_clean"
    if not (cache_dir / "manifest.json").exists():
        pytest.skip("needs the cache of the extraction test")

    def refused(*extra):
        c = load_config(ROOT / "config/tiny.yaml", overrides + [f"concept.cache_dir={cache_dir}", *extra])
        with pytest.raises(DataError) as e:
            LabelCache(c)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "k_attr 4 does not match 3 in use" in refused("concept.k_attr=3")
    assert "scoring 'attribution' does not match 'activation'" in refused("concept.scoring=activation")
    assert "block_size 64 does not match 32" in refused("train.block_size=32")
    assert "loss_scope" in refused("concept.loss_scope=next_token")
    assert "label_precision 'fp32' does not match 'bf16'" in refused("concept.label_precision=bf16")
    # A different SAE (same sizes, other weights) and a different teacher are recognised by hash.
    other = cfg.experiment_dir / "other_sae"
    save_sae(init_sae(cfg, 64, torch.randn(4, 64), seed=99), other, {"layer": LAYER})
    assert "sae_sha256" in refused(f"sae.path={other}")
    teacher_run = cfg.experiment_dir / "teacher_copy"
    teacher_run.mkdir()
    for f in ("config.json", "model.safetensors"):
        data = (Path(cfg.teacher.path) / f).read_bytes()
        (teacher_run / f).write_bytes(data if f == "config.json" else data[:-1] + bytes([data[-1] ^ 1]))  # one bit
    assert "teacher_sha256" in refused(f"teacher.path={teacher_run}")

    # The CLI turns bad input into one line and a non-zero exit.
    r = subprocess.run(cli("extract-concepts", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress",
                           *overrides, "teacher.path=null"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"cocomix: error: config key 'teacher.path': not set and no teacher run at "
                                f"{cfg.experiment_dir / 'runs' / 'teacher'} (expected a checkpoint folder or a GPT-2 folder)")
    r = subprocess.run(cli("extract-concepts", "--config", str(ROOT / "config/tiny.yaml"), "--no-progress",
                           *overrides, f"sae.path={cfg.experiment_dir / 'missing'}"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing: not found" in r.stderr


# ---- precision ----------------------------------------------------------------------------


def test_label_agreement():
    a = torch.tensor([[[3, 1, 4, 0], [5, 9, 2, 6], [-1, -1, -1, -1]]])  # (1, 3, 4); the last position unlabelled
    assert label_agreement(a, a.clone()) == {"exact": 1.0, "top1": 1.0, "overlap": 1.0}
    disjoint = torch.where(a >= 0, a + 10, a)
    assert label_agreement(a, disjoint) == {"exact": 0.0, "top1": 0.0, "overlap": 0.0}
    b = a.clone()
    b[0, 0] = torch.tensor([1, 3, 4, 7])  # position 0: other order, one latent replaced
    assert label_agreement(a, b) == {"exact": 0.5, "top1": 0.5, "overlap": (3 / 4 + 1) / 2}
    with pytest.raises(ValueError):
        label_agreement(a, a[:, :2])


def test_label_precision_context():
    """fp32 is fp32 even inside an enclosing autocast region; tf32 flips only the TF32 flag; bf16 is
    bf16 autocast; the caller's TF32 flag comes back afterwards."""
    matmul, cpu, x = torch.backends.cuda.matmul, torch.device("cpu"), torch.randn(4, 4)
    before = matmul.allow_tf32
    try:
        for flag in (False, True):
            matmul.allow_tf32 = flag
            for precision, tf32, dtype in (("fp32", False, torch.float32), ("tf32", True, torch.float32),
                                           ("bf16", False, torch.bfloat16)):
                with torch.autocast("cpu", dtype=torch.bfloat16), label_precision(cpu, precision):
                    assert matmul.allow_tf32 is tf32 and (x @ x).dtype == dtype
                assert matmul.allow_tf32 is flag
    finally:
        matmul.allow_tf32 = before
    with pytest.raises(ConfigError, match="concept.label_precision"), label_precision(cpu, "fp16"):
        pass


def test_label_precision_config(tiny_data):
    def error(*extra):
        with pytest.raises(ConfigError) as e:
            load_config(ROOT / "config/tiny.yaml", tiny_overrides(tiny_data.parent, tiny_data, *extra))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "'concept.label_precision': expected one of ['fp32', 'tf32', 'bf16'], got 'fp16'" in error(
        "concept.label_precision=fp16")
    assert "concept.labels=online computes them in fp32" in error("concept.labels=online", "concept.label_precision=bf16")


def test_extraction_is_fp32_by_default_and_bf16_is_measured(small):
    """Default extraction computes fp32 labels, the online path's, even when called inside a bf16
    autocast region (the old code used whatever autocast was active on CPU, bf16 on CUDA); bf16
    extraction runs on CPU and is measured against fp32."""
    cfg, overrides = small
    assert cfg.concept.label_precision == "fp32"
    cpu, dtype = torch.device("cpu"), label_dtype(C)
    blocks = TokenBlocks(cfg.data_dir, "train", cfg.train.block_size)
    chunks = [range(a, a + 8) for a in range(0, 32, 8)]  # extraction's own chunks (concept.extract_batch_size=8)

    def extracted(c: Config, enclosing=contextlib.nullcontext()):
        label_bytes = _chunk_labeller(c, cpu, dtype)
        with enclosing:
            raw = [np.frombuffer(label_bytes(blocks.get_batch(r)), dtype=dtype).reshape(len(r), -1, K_ATTR) for r in chunks]
        labels = torch.from_numpy(np.concatenate(raw).astype(np.int64))
        return labels.masked_fill_(labels == 65535, -1)

    teacher, sae = load_teacher(cfg), load_sae(cfg)
    with torch.autocast("cpu", enabled=False):  # as the online path computes them
        fp32 = torch.cat([concept_labels(teacher, sae, blocks.get_batch(r), cfg.concept, LAYER) for r in chunks])
    assert torch.equal(extracted(cfg, torch.autocast("cpu", dtype=torch.bfloat16)), fp32)

    bf16 = extracted(load_config(ROOT / "config/tiny.yaml", overrides + ["concept.label_precision=bf16"]))
    assert (bf16[:, -1] == -1).all() and ((bf16[:, :-1] >= 0) & (bf16[:, :-1] < C)).all()
    agreement = label_agreement(bf16, fp32)
    print(f"bf16 vs fp32 labels, {len(fp32)} blocks: {agreement}")
    assert all(0.0 <= v <= 1.0 for v in agreement.values())
    assert agreement["exact"] <= agreement["overlap"]
