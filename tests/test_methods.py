"""The method registry (cocomix/methods/): one module per method, registered once, and what a new
method file gets for free: the CLI, the DAG, the tables and MLflow (the toy `ntp_zloss`,
baselines/ntp_zloss.py, is the example)."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from cocomix.config import ConfigError, load_config
from cocomix.methods import Batch, get_method, method_names, run_fingerprint
from cocomix.methods.base import ARTIFACTS, REGISTRY, Method, register


def test_every_method_is_registered_once_under_its_name():
    assert method_names() == ["cocomix", "kd", "kd_pause", "ntp", "ntp_zloss", "pause"]
    for name in method_names():
        method = get_method(name)
        assert method.name == name and type(method) is REGISTRY[name]
        cfg = load_config(ROOT / "config/tiny.yaml", [f"method={name}"])
        assert method.artifacts(cfg) <= set(ARTIFACTS)
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Impostor", (Method,), {"name": "ntp"}))


def test_every_method_describes_itself_and_the_model_card_says_it():
    from cocomix.export import describe

    descriptions = {name: get_method(name).description for name in method_names()}
    assert all(d and d != Method.description for d in descriptions.values()), descriptions
    assert len(set(descriptions.values())) == len(descriptions)  # each says what it alone trains
    assert describe("kd") == REGISTRY["kd"].description and describe("magic") == Method.description
    # A method defined elsewhere reaches the card through its class, with no table to edit.
    toy = type("Toy", (Method,), {"name": "toy_card", "description": "a toy that predicts nothing"})
    register(toy)
    try:
        assert describe("toy_card") == "a toy that predicts nothing"
    finally:
        del REGISTRY["toy_card"]


def test_unknown_method_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^config key 'method': unknown method 'magic' \(expected one of \["):
        get_method("magic")


def test_methods_declare_what_they_need_and_read():
    cfg = lambda *o: load_config(ROOT / "config/tiny.yaml", list(o))  # noqa: E731
    assert get_method("ntp").artifacts(cfg()) == set() and get_method("pause").artifacts(cfg()) == set()
    assert get_method("kd").artifacts(cfg()) == {"teacher"} == get_method("kd_pause").artifacts(cfg())
    assert get_method("cocomix").artifacts(cfg()) == {"labels"}
    assert get_method("cocomix").artifacts(cfg("concept.labels=online")) == {"teacher", "sae"}
    assert get_method("cocomix").artifacts(cfg("concept.target=hidden_l2")) == {"teacher"}
    # A run's fingerprint covers the sections its method reads, and only those.
    assert run_fingerprint(cfg("method=kd")) != run_fingerprint(cfg("method=kd", "kd.lam=0.5"))
    assert run_fingerprint(cfg("method=ntp")) == run_fingerprint(cfg("method=ntp", "kd.lam=0.5"))
    assert run_fingerprint(cfg("method=pause")) != run_fingerprint(cfg("method=pause", "concept.insert_layer=1"))
    assert run_fingerprint(cfg("method=pause")) == run_fingerprint(cfg("method=pause", "concept.k=4"))


def test_z_loss_is_ntp_plus_the_squared_log_normaliser():
    cfg = load_config(ROOT / "config/tiny.yaml", ["method=ntp_zloss"])
    torch.manual_seed(0)
    method = get_method("ntp_zloss")
    model = method.build_model(cfg, 512, 0)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, parts = method.loss(model, Batch(ids))
    ntp_loss, _ = get_method("ntp").loss(model, Batch(ids))
    logits = model(ids).logits.double()
    log_z = torch.log(torch.exp(logits[:, :-1]).sum(-1))  # independent of logsumexp
    assert parts["z_loss"].item() == pytest.approx((log_z**2).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(ntp_loss.item() + 1e-4 * parts["z_loss"].item(), rel=1e-6)


@pytest.mark.slow
def test_a_method_in_one_new_file_reaches_the_dag_the_tables_and_mlflow(tmp_path):
    import mlflow

    config = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    config["dag"] = {"methods": ["ntp", "ntp_zloss"], "seeds": [0], "evaluate": False}
    config["train"]["tokens"] = 32768
    path = tmp_path / "zloss.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                           str(tmp_path), "--config", f"config={path}", "--cores", "2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # No teacher, SAE or labels were built: neither method needs them.
    exp = tmp_path / "results" / "ci"
    assert sorted(p.name for p in (exp / "runs").iterdir()) == ["ntp-base-s0", "ntp_zloss-base-s0"]
    assert not (exp / "sae").exists() and not (exp / "concepts").exists()
    main = (exp / "tables" / "main.csv").read_text().splitlines()
    assert any(line.startswith("base,ntp_zloss,1,") for line in main), main
    uri = f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').resolve()}"
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("ci").experiment_id], "tags.method = 'ntp_zloss'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "train/z_loss" in runs[0].data.metrics and "val/loss" in runs[0].data.metrics
