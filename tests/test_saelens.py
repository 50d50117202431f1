"""SAELens interop (cocomix/saelens.py), checked with the real sae-lens package (the `saelens` extra):
our SAE exported to its format loads in SAELens with identical encodings and reconstructions; a TopK SAE
SAELens itself wrote imports with identical encodings (OpenAI's layer norm, with b_dec applied to the
input or not); `sae.path` may name such a folder."""

import pytest
import torch

from cocomix.sae import TopKSAE
from cocomix.saelens import export_saelens

import_saelens = TopKSAE.from_saelens

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[saelens]'; make test installs it)")


def _ours(d=32, n=96, k=6, normalize=True) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(d, n, k, normalize=normalize)
    for p in sae.parameters():
        torch.nn.init.normal_(p)
    return sae.eval()


def _dense(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    acts, idx, _ = sae.encode(x)
    return torch.zeros(*x.shape[:-1], sae.n_latents).scatter(-1, idx, acts)


@pytest.mark.parametrize("normalize", [True, False])
def test_our_sae_exported_loads_in_saelens_with_identical_encodings(tmp_path, normalize):
    ours = _ours(normalize=normalize)
    folder = export_saelens(ours, tmp_path / "sae", hook_name="blocks.5.hook_resid_post", model_name="gpt2")
    theirs = sae_lens.SAE.load_from_disk(folder)
    assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.k == 6
    x = torch.randn(4, 10, 32) * 3 + 1
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), _dense(ours, x), atol=1e-5)
        assert torch.allclose(theirs(x), ours(x), atol=1e-4)
        back = import_saelens(folder)
        assert torch.equal(_dense(back, x), _dense(ours, x))


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_a_saelens_topk_sae_imports_with_identical_encodings(tmp_path, apply_b_dec):
    cfg = sae_lens.TopKSAEConfig(d_in=32, d_sae=64, k=5, dtype="float32", device="cpu",
                                 apply_b_dec_to_input=apply_b_dec, normalize_activations="layer_norm")
    torch.manual_seed(1)
    theirs = sae_lens.TopKSAE(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    theirs.save_model(tmp_path / "theirs")
    ours = import_saelens(tmp_path / "theirs").eval()
    x = torch.randn(3, 7, 32) * 2 - 0.5
    with torch.no_grad():
        assert torch.allclose(_dense(ours, x), theirs.encode(x), atol=1e-4)
        assert torch.allclose(ours(x), theirs(x), atol=1e-3)


def test_sae_path_may_name_a_saelens_folder_and_other_architectures_are_one_line(tmp_path, tiny_data):
    import json

    from cocomix.config import ConfigError, load_config
    from cocomix.sae import load_sae, sae_hash
    from conftest import ROOT, tiny_overrides

    folder = export_saelens(_ours(64, 128, 8), tmp_path / "sae", hook_name="blocks.1.hook_resid_post")
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path, tiny_data, f"sae.path={folder}",
                                                                "sae.n_latents=128", "sae.k=8"))
    assert load_sae(cfg).n_latents == 128 and len(sae_hash(cfg)) == 64
    cfg_file = folder / "cfg.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "architecture": "jumprelu"}))
    with pytest.raises(ConfigError, match=r"^config key 'sae.path': .*cfg.json: architecture 'jumprelu'; only SAELens "
                                          r"'topk' SAEs map onto ours$"):
        load_sae(cfg)
