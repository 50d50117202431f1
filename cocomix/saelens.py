"""SAELens interop: our TopK SAE in the format SAELens and the interpretability tools that read it
(SAEDashboard, Neuronpedia) use, and a SAELens TopK SAE as `sae.path`.

A SAELens folder holds `cfg.json` and `sae_weights.safetensors` (W_enc (d_in, d_sae), b_enc (d_sae),
W_dec (d_sae, d_in), b_dec (d_in)). Ours (cocomix/sae.py, OpenAI's convention) maps onto its `topk`
architecture exactly:

    ours                          SAELens
    encoder.weight (C, d)         W_enc = its transpose
    latent_bias (C)               b_enc
    decoder.weight (d, C)         W_dec = its transpose
    pre_bias (d)                  b_dec, with apply_b_dec_to_input: true
    normalize (OpenAI's LN)       normalize_activations: layer_norm ((x - mu) / (std + 1e-5), unbiased std)

Read back (`read_saelens`; `TopKSAE.from_saelens` in cocomix/sae.py), an SAE with `apply_b_dec_to_input: false` folds b_dec into the latent bias (b_lat = b_enc +
b_dec W_enc), so its encodings are the same; other architectures or normalisations are one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cocomix.config import ConfigError
from cocomix.data import DataError
from cocomix.files import atomic_write_text

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"  # SAELens's file names (sae_lens.constants)


def is_saelens(path: Path) -> bool:
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def export_saelens(sae, folder: str | Path, *, hook_name: str, model_name: str | None = None,
                   context_size: int | None = None) -> Path:
    """Write `sae` (a `cocomix.sae.TopKSAE`) as a SAELens TopK SAE folder (`SAE.load_from_disk(folder)`)."""
    from safetensors.torch import save_file  # lazy: only for export

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.encoder.weight.detach().t().contiguous().float().cpu(),
               "b_enc": sae.latent_bias.detach().float().cpu().contiguous(),
               "W_dec": sae.decoder.weight.detach().t().contiguous().float().cpu(),
               "b_dec": sae.pre_bias.detach().float().cpu().contiguous()}
    save_file(tensors, str(folder / WEIGHTS))
    cfg = {"architecture": "topk", "d_in": sae.d_model, "d_sae": sae.n_latents, "k": sae.k,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "layer_norm" if sae.normalize else "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": False,
           "metadata": {"model_name": model_name, "hook_name": hook_name, "context_size": context_size,
                        "sae_lens_training_version": None, "prepend_bos": False}}
    atomic_write_text(folder / CFG, json.dumps(cfg, indent=2))
    return folder


def read_saelens(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A SAELens TopK SAE folder as ({d_model, n_latents, k, normalize}, our tensors: pre_bias,
    encoder.weight, latent_bias, decoder.weight) with identical encodings (module docstring);
    `TopKSAE.from_saelens` builds the SAE. Other architectures or normalisations are one line."""
    from safetensors.torch import load_file  # lazy: only for a SAELens SAE

    folder = Path(folder)
    try:
        cfg = json.loads((folder / CFG).read_text())
        state = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError) as e:
        raise DataError(f"SAE {folder}: not a readable SAELens folder ({str(e).splitlines()[0][:120]})") from None
    where = f"config key 'sae.path': {folder / CFG}"
    if cfg.get("architecture") != "topk":
        raise ConfigError(f"{where}: architecture {cfg.get('architecture')!r}; only SAELens 'topk' SAEs map onto ours")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("layer_norm", "none"):
        raise ConfigError(f"{where}: normalize_activations {norm!r}; expected 'layer_norm' (OpenAI's) or 'none'")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ConfigError(f"{where}: rescale_acts_by_decoder_norm is true; not supported")
    w_enc, b_enc, w_dec, b_dec = (state[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    d_in, d_sae = w_enc.shape
    # W_enc x + b_enc = W_enc (x - b_dec) + (b_enc + b_dec W_enc) when b_dec is not applied to the input
    latent_bias = b_enc if cfg.get("apply_b_dec_to_input", True) else b_enc + b_dec @ w_enc
    shape = {"d_model": d_in, "n_latents": d_sae, "k": int(cfg["k"]), "normalize": norm == "layer_norm"}
    return shape, {"pre_bias": b_dec, "encoder.weight": w_enc.t().contiguous(), "latent_bias": latent_bias,
                   "decoder.weight": w_dec.t().contiguous()}
