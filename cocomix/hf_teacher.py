"""Any Hugging Face causal LM as the teacher (GPT-NeoX/Pythia, Llama, Qwen, ...): `HFTeacher` wraps an
`AutoModelForCausalLM` so that everything that reads a teacher sees the interface of our backbone.

What a teacher is asked for (cocomix/teacher.py, concepts.py, sae.py, flops.py, interpret.py):

    teacher(input_ids=..., use_cache=False).logits         the model's own forward
    teacher.transformer.h[layer]                           its decoder layers: the residual stream after
                                                           block `layer` is that layer's output, read and
                                                           edited by a forward hook (`run_teacher`)
    teacher.transformer.ln_f, teacher.lm_head              the final norm and the unembedding (logit lens)
    teacher.config.n_embd / n_layer / n_head / vocab_size / real_vocab_size / n_positions
    teacher.flops_per_token(T)                             the 6-per-parameter training convention of
                                                           cocomix/flops.py: weights of the blocks and the
                                                           LM head, plus 12 * n_layer * d * T for attention
    teacher.slot                                           None: a plain LM

GPT-2 folders are not wrapped: they are converted into our backbone exactly (`from_gpt2`). A decoder layer
that returns a tuple (hidden states first) is handled by the hook (`layer_output`, `with_layer_output`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

# Where architectures keep their final norm (on the base model): GPT-2 ln_f, Llama/Qwen norm, GPT-NeoX
# final_layer_norm.
FINAL_NORMS = ("ln_f", "norm", "final_layer_norm")


def layer_output(output):
    """The hidden states of a decoder layer's output (a tensor, or a tuple whose first item they are)."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_output(output, h):
    """`output` with its hidden states replaced by `h` (what a forward hook returns)."""
    return (h, *output[1:]) if isinstance(output, tuple) else h


def _decoder_layers(model) -> torch.nn.ModuleList:
    n = model.config.num_hidden_layers
    lists = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers found")
    return lists[0]


class HFTeacher(torch.nn.Module):
    """A transformers causal LM seen through our backbone's interface (module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        c = model.config
        norm = next((getattr(model.base_model, n) for n in FINAL_NORMS if hasattr(model.base_model, n)), None)
        vocab = c.vocab_size
        self.config = SimpleNamespace(
            model_type=c.model_type, n_embd=c.hidden_size, n_layer=c.num_hidden_layers,
            n_head=c.num_attention_heads, vocab_size=vocab, real_vocab_size=vocab,
            n_positions=getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None), slot=None)
        # plain attributes, not submodules: the layers are registered once, under self.model
        object.__setattr__(self, "transformer", SimpleNamespace(h=_decoder_layers(model), ln_f=norm))
        object.__setattr__(self, "lm_head", model.get_output_embeddings())
        self.slot = None

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **kwargs):
        return self.model(input_ids=input_ids, use_cache=False, **kwargs)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token by our convention: 6 per weight of the blocks and the LM head (the
        input embedding is a lookup) and 12 * n_layer * d * T for attention."""
        blocks = sum(p.numel() for p in self.transformer.h.parameters())
        head = self.lm_head.weight.numel()
        d, layers = self.config.n_embd, self.config.n_layer
        return 6 * (blocks + head) + 12 * layers * d * seq_len


def load_hf_teacher(path, meta: bool = False) -> HFTeacher:
    """An `AutoModelForCausalLM` folder as the teacher (its weights; or, with `meta`, its shape only)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: transformers' auto classes

    if meta:
        with torch.device("meta"):
            return HFTeacher(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))
    return HFTeacher(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
