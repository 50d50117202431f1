"""FLOPs per training token: what the student costs, and what an online teacher costs on top.

The student's training FLOPs per token come from the model itself (`CocomixForCausalLM.
flops_per_token`, PaLM/nanoGPT convention: 6 FLOPs per matmul weight plus 12 * n_layer * d * T
for attention; every variant of the backbone keeps that method correct). This module adds the
cost spent *outside* the student, which every run reports separately as
`teacher_flops_per_token` (spec section 6, question 10: the paper's compute figures appear to
leave it out, so we never fold it into the student's number):

    method                           teacher FLOPs per student training token
    NTP, pause, CoCoMix (cached)     0            labels were extracted once, before training
    KD, KD + pause                   forward      the teacher's logits at every position
    CoCoMix (online labels)          forward + backward to the SAE layer + SAE (spec 1.2)

and the one-off costs a run depends on, which the compute ledger (`compute` in final_metrics.json,
`Method.one_off_flops`) lists apart because every run of an experiment that reads them shares them:

    teacher_training     the teacher run's own training FLOPs (its flops_per_token x tokens; a given
                         teacher: `teacher.training_flops` when the config states it, else not counted)
    sae_training         `sae_training_flops_per_token` x sae.tokens (a given SAE, sae.path: not counted)
    label_extraction     `concept_label_flops_per_token` x every labelled token (train + val blocks)

Same convention as the student: a matmul weight costs 2 FLOPs per token forward; softmax,
LayerNorm, GELU and losses are not counted; attention is counted over the full T x T square. The LM
head counts its padded width (`config.vocab_size`, `model.vocab_multiple`): the matmul runs over the
padding rows too, although their logits are then set to -inf.
"""

from __future__ import annotations


def block_params(model) -> int:
    """Parameters of one transformer block (all blocks of our backbone have the same shape)."""
    return sum(p.numel() for p in model.transformer.h[0].parameters())


def forward_flops_per_token(model, seq_len: int) -> int:
    """One forward pass of a plain backbone (a teacher) per token at context length seq_len: a third of
    the training FLOPs of `CocomixForCausalLM.flops_per_token` (the one formula: 2 FLOPs per matmul
    weight and 4 * d * T per layer of attention forward, the backward pass twice that)."""
    if model.slot is not None:
        raise ValueError("forward_flops_per_token is for plain backbones (teachers), not slot models")
    return model.flops_per_token(seq_len) // 3


def concept_label_flops_per_token(teacher, sae_layer: int, n_latents: int, seq_len: int,
                                  scoring: str = "attribution") -> int:
    """Online concept labels (spec 1.2) per token: what `concept.labels=online` adds to every step.

    attribution (the official code; attribution_preact is costed the same, its pre-activations come
    from the same encode; the paper's per-position `concept.loss_scope=next_token`, T-1 backward
    passes, is an analysis option and not covered):
      teacher forward over the whole block                 forward_flops_per_token(teacher)
      backward from the mean loss to the output of block `sae_layer`, activation gradients only
      (the teacher is frozen, so no weight gradients):
        LM head, ln_f and the blocks above sae_layer       2 FLOPs per weight (one matmul each)
        attention in those blocks                          8 * d * T (dS.K, dS^T.Q, dO.V^T, P^T.dO)
      SAE encode (W_enc, dense C x d)                      2 * d * C
      g @ W_dec (dense, as in the code)                    2 * d * C
    activation (the ablation): the forward up to and including block `sae_layer`, then the encode.
    """
    cfg = teacher.config
    d, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    encode = 2 * d * n_latents
    if scoring == "activation":
        below = sae_layer + 1  # blocks 0..sae_layer
        return 2 * below * block_params(teacher) + 4 * below * d * seq_len + encode
    above = L - sae_layer - 1  # blocks the gradient flows back through
    backward = 2 * (above * block_params(teacher) + 2 * d + V * d) + 8 * above * d * seq_len
    return forward_flops_per_token(teacher, seq_len) + backward + encode + 2 * d * n_latents


def sae_training_flops_per_token(teacher, sae_layer: int, n_latents: int, k: int, aux_k: int, seq_len: int) -> int:
    """Training the TopK SAE (cocomix/sae.py) per activation token: the frozen teacher's forward up to
    and including block `sae_layer` (no gradients), then the SAE's training step at 3x its forward
    matmuls: the dense encode (2 d C) and the sparse decodes of the k active and aux_k AuxK latents
    (2 d k, 2 d aux_k; a gather of columns, not a dense matmul)."""
    d = teacher.config.n_embd
    below = sae_layer + 1
    teacher_forward = 2 * below * block_params(teacher) + 4 * below * d * seq_len
    return teacher_forward + 3 * (2 * d * n_latents + 2 * d * k + 2 * d * aux_k)
