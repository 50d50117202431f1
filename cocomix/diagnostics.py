"""What the LM head's read-out slot does, for the methods that interleave a slot after every token
(CoCoMix and its interleaving ablations, pause tokens). Each a per-block value on held-out blocks,
logged as `val/<name>` at every in-training evaluation (metrics.jsonl and MLflow):

    readout_self_attn          attention mass the slot the LM head reads gives its own token's position
                               (token t at 2t; the concept or pause slot after it at 2t+1), mean over
                               the blocks above the insertion point, their heads and the positions
    readout_self_attn_uniform  the same for attention spread evenly over the causal prefix: mean over t of
                               1 / (r_t + 1) for read-out position r_t (the baseline of "no preference")
    loss_no_concept            held-out next-token loss with the concept code removed: every concept's
                               logit scaled to 0 before TopK (the steering path), so each concept slot
                               carries only its biases and its token's own statistics (concept models)

With `readout: token` the read-out slot is the token's own, so its "own token" is itself. The
concept prediction accuracy (`val/concept_acc`, `val/concept_acc_any`) comes from the CoCoMix
method itself. `eval.diagnostics: false` turns these off (two more forwards per evaluation batch,
one with eager attention: at most one block's (B, n_head, 2T, 2T) map in memory at a time).
"""

from __future__ import annotations

import torch

from cocomix.model import token_nll


def readout_positions(slot, T: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions the LM head reads, each token's own position) in the interleaved stream, both (T,)."""
    n = slot.streams
    stream = torch.arange(n * T, device=device).view(1, n * T, 1)
    return slot.readout(stream)[0, :, 0], torch.arange(T, device=device) * n


@torch.no_grad()
def readout_diagnostics(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per held-out block (B,) diagnostics of an interleaving model (see the module docstring); {} for
    a model without an interleaved slot."""
    slot = getattr(model, "slot", None)
    if slot is None or slot.streams < 2:
        return {}
    B, T = input_ids.shape
    read, own = readout_positions(slot, T, input_ids.device)
    insert = model.config.insert_layer
    masses: list[torch.Tensor] = []

    def reduce(index):
        def hook(module, args, output):
            x, weights = output
            if index >= insert:  # (B, n_head, 2T, 2T) -> (B,): the read-out rows at their own token's column
                masses.append(weights[:, :, read, own].float().mean(dim=(1, 2)))
            return x, None  # the map is dropped here, not kept for the model's output
        return hook

    handles = [block.register_forward_hook(reduce(i)) for i, block in enumerate(model.transformer.h)]
    previous = model.config._attn_implementation
    try:
        model.config._attn_implementation = "eager"  # the maps, without SDPA's fallback warning
        model(input_ids=input_ids, use_cache=False, output_attentions=True)
    finally:
        model.config._attn_implementation = previous
        for h in handles:
            h.remove()
    out = {"readout_self_attn": torch.stack(masses).mean(0),
           "readout_self_attn_uniform": (1.0 / (read.double() + 1)).mean().float().expand(B)}
    if model.config.slot == "concept":
        with model.steer_concepts({i: 0.0 for i in range(slot.n_concepts)}):
            logits = model(input_ids=input_ids, use_cache=False).logits
        out["loss_no_concept"] = token_nll(logits, input_ids).mean(dim=1)
    return out



def slot_norm_ratio(model, tokens: int = 1024, seed: int = 0) -> float | None:
    """The concept slot's norm relative to its token's, mean over `tokens` hidden states drawn N(0, 1):
    ||c_t - mu_t|| / ||h_t - mu_t||, which depends on the slot's weights and shape only (d, C, k; at
    init model.init_std and concept.init_scale), not on the scale or mean of h. None for a model
    without a concept slot. Training logs the same quantity on its own hidden states
    (train/slot_norm_ratio)."""
    if getattr(model.config, "slot", None) != "concept":
        return None
    h = torch.randn(1, tokens, model.config.n_embd, generator=torch.Generator().manual_seed(seed))
    training = model.slot.training
    model.slot.train()  # the ratio is measured in training mode only
    with torch.no_grad():
        _, prediction = model.slot.predict(h)
    model.slot.train(training)
    return float(prediction.norm_ratio)
