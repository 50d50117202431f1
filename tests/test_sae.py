"""TopK SAE: the equations against hand-written references, OpenAI's format, AuxK, and a real
training run on the tiny teacher (FVU, L0, dead latents, concept recovery, MLflow + JSON)."""

import json

import numpy as np
import pytest
import torch

from cocomix.config import ConfigError, load_config
from cocomix.data import DataError
from cocomix.sae import TopKSAE, auroc_matrix, init_sae, load_sae, train_step_loss, train_sae
from conftest import ROOT, tiny_overrides

D, C, K = 16, 64, 4


def _random_sae(seed=0, d=D, c=C, k=K) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d, c, k)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


def _spec_encode_decode(x, pre_bias, W_enc, b_lat, W_dec, k):
    """Spec 1.1 written out with no shared code: dense c (N, C) and x̂ (N, d)."""
    mu = x.mean(dim=-1, keepdim=True)
    sigma = torch.sqrt(((x - mu) ** 2).sum(dim=-1, keepdim=True) / (x.shape[-1] - 1))  # unbiased
    x_tilde = (x - mu) / (sigma + 1e-5)
    c_pre = (x_tilde - pre_bias) @ W_enc.T + b_lat
    kth = c_pre.sort(dim=-1, descending=True).values[..., k - 1 : k]
    c = torch.where(c_pre >= kth, torch.clamp(c_pre, min=0), torch.zeros_like(c_pre))
    x_hat = (c @ W_dec.T + pre_bias) * sigma + mu
    return c, x_hat


def _dense(top_acts, top_indices, n_latents):
    return torch.zeros(*top_acts.shape[:-1], n_latents, dtype=top_acts.dtype).scatter(-1, top_indices, top_acts)


def test_encode_decode_match_spec_equations_and_gather_gradients():
    sae = _random_sae().double()
    x = torch.randn(10, D, dtype=torch.float64) * 3 + 1
    top_acts, top_indices, info = sae.encode(x)
    c_ref, x_hat_ref = _spec_encode_decode(x, sae.pre_bias, sae.encoder.weight, sae.latent_bias, sae.W_dec, K)
    assert top_acts.shape == top_indices.shape == (10, K)
    torch.testing.assert_close(_dense(top_acts, top_indices, C), c_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(sae.decode(top_acts, top_indices, info), x_hat_ref, rtol=0, atol=1e-10)

    # The gather decode has the gradients of the dense W_dec @ c (sparsify's check).
    acts = top_acts.detach().clone().requires_grad_(True)
    sae.decode_normalized(acts, top_indices).pow(2).sum().backward()
    grad_gather, grad_acts = sae.W_dec.grad.clone(), acts.grad.clone()
    sae.W_dec.grad = None
    acts2 = top_acts.detach().clone().requires_grad_(True)
    (_dense(acts2, top_indices, C) @ sae.W_dec.T + sae.pre_bias).pow(2).sum().backward()
    torch.testing.assert_close(grad_gather, sae.W_dec.grad)
    torch.testing.assert_close(grad_acts, acts2.grad)


def _openai_state_dict(d=D, c=C, k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "pre_bias": torch.randn(d, generator=g),
        "encoder.weight": torch.randn(c, d, generator=g),
        "latent_bias": torch.randn(c, generator=g),
        "decoder.weight": torch.randn(d, c, generator=g),
        "stats_last_nonzero": torch.randint(0, 100, (c,), generator=g),
        "latents_activation_frequency": torch.rand(c, generator=g),
        "latents_mean_square": torch.rand(c, generator=g),
        "activation": "TopK",
        "activation_state_dict": {"k": k, "postact_fn": "ReLU"},
    }


def test_openai_format_loader_matches_spec(tmp_path):
    state = _openai_state_dict()
    path = tmp_path / "5.pt"
    torch.save(state, path)
    cfg = load_config(None, [f"sae.path={path}", f"sae.n_latents={C}", f"sae.k={K}", "concept.k=4"])
    sae = load_sae(cfg)
    assert (sae.n_latents, sae.k, sae.d_model) == (C, K, D)
    assert torch.equal(sae.stats_last_nonzero, state["stats_last_nonzero"])
    x = torch.randn(7, 3, D) * 2 - 0.5
    top_acts, top_indices, info = sae.encode(x)
    c_ref, x_hat_ref = _spec_encode_decode(
        x, state["pre_bias"], state["encoder.weight"], state["latent_bias"], state["decoder.weight"], K)
    torch.testing.assert_close(_dense(top_acts, top_indices, C), c_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(top_acts, top_indices, info), x_hat_ref, rtol=1e-5, atol=1e-4)

    # Sizes must agree with the config; a file of another format is refused in one line.
    bad = load_config(None, [f"sae.path={path}", f"sae.n_latents={C}", "sae.k=8", "concept.k=4"])
    with pytest.raises(ConfigError, match=r"^config key 'sae.k': 8, but the SAE in .*5.pt has 4$"):
        load_sae(bad)
    del state["latent_bias"]
    torch.save(state, tmp_path / "broken.pt")
    cfg = load_config(None, [f"sae.path={tmp_path / 'broken.pt'}", f"sae.n_latents={C}", f"sae.k={K}", "concept.k=4"])
    with pytest.raises(DataError, match=r"missing key 'latent_bias'") as e:
        load_sae(cfg)
    assert "\n" not in str(e.value)
    missing = load_config(None, [f"sae.path={tmp_path / 'nope.pt'}"])
    with pytest.raises(DataError, match=r"SAE .*nope.pt: not found"):
        load_sae(missing)


def test_init_and_auxk_gives_gradient_to_dead_latents():
    cfg = load_config(None, [f"sae.n_latents={C}", f"sae.k={K}", "concept.k=4"])
    x = torch.randn(8, D)  # 8 tokens x k=4 leave most of the 64 latents unselected
    sae = init_sae(cfg, D, x, seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(C))
    assert torch.equal(sae.encoder.weight, sae.W_dec.t())

    # Latents never selected by TopK get gradient only through AuxK.
    top = sae.encode(x)[1]
    dead = torch.ones(C, dtype=torch.bool)
    dead[top.unique()] = False
    assert dead.sum() > 0
    for aux_coef, expect_grad in ((0.0, False), (1 / 32, True)):
        sae.zero_grad(set_to_none=True)
        loss, *_ = train_step_loss(sae, x, dead, aux_k=8, aux_coef=aux_coef)
        loss.backward()
        got = sae.encoder.weight.grad[dead].abs().sum() > 0
        assert bool(got) == expect_grad


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(300, 5)).astype(np.float32)  # many ties, like sparse codes
    labels = rng.random((300, 3)) < 0.3
    labels[:, 0] |= scores[:, 2] > 2
    got = auroc_matrix(scores, labels)
    want = np.array([[roc_auc_score(labels[:, m], scores[:, c]) for c in range(5)] for m in range(3)])
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_a_concept_spread_over_a_few_latents_is_found_by_the_top_k_score_on_held_out_tokens():
    """One concept fired by one of three latents per positive token (three word clusters): no single
    latent detects it (AUROC ~0.67), the three together do (1.0 held out); the value is sklearn's AUROC
    of the summed, standardised latents picked on the first half, scored on the second."""
    from sklearn.metrics import roc_auc_score

    from cocomix.sae import top_k_auroc

    rng = np.random.default_rng(1)
    n, c = 2000, 12
    labels = rng.random((n, 1)) < 0.3
    dense = np.zeros((n, c))
    which = rng.integers(0, 3, size=n)
    dense[labels[:, 0], which[labels[:, 0]]] = rng.uniform(1, 2, size=labels.sum())  # latents 0-2: the concept
    other = rng.integers(3, c, size=n)
    dense[~labels[:, 0], other[~labels[:, 0]]] = rng.uniform(1, 2, size=(~labels).sum())  # the rest
    assert auroc_matrix(dense, labels).max() < 0.7
    got = top_k_auroc(dense, labels, k=3)
    half = n // 2
    picked = [0, 1, 2]
    want = roc_auc_score(labels[half:, 0], (dense[half:, picked] / dense[:half, picked].std(axis=0)).sum(axis=1))
    assert got == pytest.approx(want, abs=1e-12) and got == pytest.approx(1.0)
    assert top_k_auroc(dense, labels, k=1) < 0.7  # k=1: one cluster's latent


SAE_OVERRIDES = ["sae.n_latents=128", "sae.k=8", "concept.k=8", "sae.aux_k=32", "sae.tokens=160000",
                 "sae.batch_tokens=1024", "sae.buffer_tokens=8192", "sae.dead_after_tokens=40000", "sae.lr=2e-3",
                 "eval.max_blocks=64", "eval.batch_size=32", "tracking.enabled=true"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, tiny_teacher):
    root = tmp_path_factory.mktemp("sae")
    cfg = load_config(ROOT / "config/tiny.yaml",
                      tiny_overrides(root, tiny_data, f"teacher.path={tiny_teacher}", *SAE_OVERRIDES))
    return cfg, train_sae(cfg, progress=False)


def test_sae_on_tiny_teacher(trained):
    cfg, metrics = trained
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    assert metrics["fvu"] < 0.15
    assert metrics["l0"] == pytest.approx(cfg.sae.k, abs=0.05)
    assert metrics["dead_fraction"] < 0.10
    assert abs(metrics["loss_increase"]) < 0.5 and metrics["loss_clean"] > 0
    # Concept recovery on the synthetic corpus, against blindly picked latents.
    assert metrics["recovery/n_concepts"] >= 10
    assert metrics["recovery/best_auroc"] > metrics["recovery/random_auroc"] + 0.05
    assert abs(metrics["recovery/random_auroc"] - 0.5) < 0.02
    assert metrics["recovery/top8_auroc"] > metrics["recovery/best_auroc"] - 0.05  # held out, yet not worse
    assert 0.5 < metrics["recovery/untrained_top8_auroc"] < 1

    folder = cfg.experiment_dir / "sae"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "metrics.json", "metrics.jsonl", "mlflow_run_id", "sae.safetensors", "sae_config.json"]
    assert not (cfg.experiment_dir / "sae.tmp").exists()
    on_disk = json.loads((folder / "metrics.json").read_text())
    assert on_disk["fvu"] == metrics["fvu"]

    # The same numbers are in MLflow, under a run named "sae".
    import mlflow

    from cocomix.tracking import tracking_uri

    run = mlflow.MlflowClient(tracking_uri(cfg)).get_run(on_disk["mlflow_run_id"])
    assert run.info.run_name == "sae" and run.info.status == "FINISHED"
    for key in ("fvu", "l0", "dead_fraction", "loss_increase", "recovery/best_auroc"):
        assert run.data.metrics[f"sae/{key}"] == pytest.approx(metrics[key])

    # Reloaded: unit-norm decoder, same reconstruction.
    sae = load_sae(cfg)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(sae.n_latents), rtol=0, atol=1e-5)
    x = torch.randn(5, sae.d_model)
    assert sae(x).shape == (5, sae.d_model)
    wrong_layer = load_config(ROOT / "config/tiny.yaml", tiny_overrides(
        cfg.results_dir, cfg.data_dir, *SAE_OVERRIDES, "sae.layer=0"))
    with pytest.raises(ConfigError, match=r"^config key 'sae.layer': 0, but the SAE in .* was trained on layer 1$"):
        load_sae(wrong_layer)
