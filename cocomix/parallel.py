"""How the trainer spreads one model over its processes: `train.parallel`.

    ddp    every process holds the whole model, gradients are all-reduced (DistributedDataParallel);
           the default, and the official code's
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block, then the root (the
           embeddings, the tied head, the concept path), is sharded over the processes, so weights,
           gradients and AdamW state cost 1/N of the model per process; under bf16 autocast the
           gathered weights are cast to bf16 for compute and gradients are reduced in fp32
           (`MixedPrecisionPolicy`), what autocast over DDP computes

Both compute the same step (the same mean loss over the same global batch); FSDP's losses equal
DDP's to float rounding (tests/test_parallel.py). One process shards nothing (there is nothing to
shard over) but still writes its optimizer state in FSDP's checkpoint format.

Checkpoints stay the one format (cocomix/checkpoints.py): model.safetensors holds the full weights
(gathered to rank 0, so evaluation, export and `from_pretrained` read any run alike) and only the
optimizer state differs: `trainer/optimizer.pt` (one file, written by rank 0) under DDP, a
torch.distributed.checkpoint folder `trainer/optimizer/` (each process writes its shards) under FSDP.
Either resumes under either setting and on any number of processes: the folder is resharded by
torch.distributed.checkpoint, the file is keyed by parameter names and sharded on load.
`train.activation_checkpointing` recomputes each block's activations in the backward pass (the
model's `gradient_checkpointing_enable`), for either setting.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from cocomix.device import Dist

# torch.distributed.fsdp and .checkpoint are imported where used: about 0.7 s that only FSDP runs and
# checkpoint folders pay.

# Methods of the model that run parameters outside forward() (held-out concept metrics): under FSDP
# they must gather the weights as forward does.
FORWARD_METHODS = ("predict_concepts",)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is FSDP-sharded (nothing is, while torch.distributed.fsdp was never imported)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def prepare(model: torch.nn.Module, parallel: str, activation_checkpointing: bool, bf16: bool, d: Dist) -> None:
    """Set up `model` in place for `train.parallel` (FSDP on several processes: shard it, before the
    optimizer is built over its parameters; DDP wraps it later, `wrap_ddp`, after resuming) and
    `train.activation_checkpointing`."""
    if activation_checkpointing:
        with warnings.catch_warnings():  # transformers 5.24 renamed it (a FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
    if parallel == "fsdp" and d.world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method  # lazy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        for name in FORWARD_METHODS:
            if hasattr(model, name):
                register_fsdp_forward_method(model, name)


def wrap_ddp(model: torch.nn.Module, d: Dist, device: torch.device, find_unused: bool) -> torch.nn.Module:
    """The DDP wrapper over an unsharded model on several processes; the model itself otherwise."""
    if d.world_size == 1 or is_sharded(model):
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if device.type == "cuda" else None, find_unused_parameters=find_unused)


def gradient_sync(model: torch.nn.Module, train_model: torch.nn.Module, d: Dist, last: bool):
    """The context of one micro-batch's backward: gradients synchronise on the last micro-batch of a
    step only (gradient accumulation). `model` owns the weights, `train_model` runs the forward."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return train_model.no_sync() if d.world_size > 1 and not last else nullcontext()


def local_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP's is a DTensor over the processes)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---- checkpoints ----


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's tensors on rank 0 (CPU) for model.safetensors; None when the model is not
    sharded (save it as it is). Every process must call it (the shards are gathered)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # lazy

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # stored once, as save_pretrained does
    return {k: v for k, v in weights.items() if k not in tied}


def empty_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The model's own class (not FSDP's subclass of it) built on the meta device from its config: what
    writes a checkpoint folder (config.json naming the right class, the remote code) from `full_weights`."""
    from torch.distributed.fsdp import FSDPModule  # lazy: only FSDP needs it

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        return cls(model.config)


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load full tensors into `model`, sharded or not: (missing, unexpected) names, as load_state_dict."""
    if not is_sharded(model):
        return model.load_state_dict(weights, strict=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    own = set(get_model_state_dict(model).keys())
    missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
    set_model_state_dict(model, {k: v for k, v in weights.items() if k in own},
                         options=StateDictOptions(full_state_dict=True, strict=False))
    return missing, unexpected


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write the optimizer state as a torch.distributed.checkpoint folder, each process its shards.
    Every process must call it with the same `folder` (on a file system they share)."""
    import torch.distributed.checkpoint as dcp  # lazy: only FSDP checkpoints need it
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    dcp.save({"optimizer": state}, checkpoint_id=str(folder), no_dist=not dist.is_initialized())


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path | None,
                   saved: dict | None) -> None:
    """Restore the optimizer from a checkpoint's torch.distributed.checkpoint `folder` (any number of
    processes wrote it) or from `saved`, optimizer.pt's content (one process's full state, keyed by
    position), under either setting and on any number of processes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    if folder is not None:
        import torch.distributed.checkpoint as dcp  # lazy: only FSDP checkpoints need it

        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the template the shards fill
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        return
    if not is_sharded(model):
        optimizer.load_state_dict(saved)
        return
    # optimizer.pt numbers parameters in the order of the optimizer's groups; FSDP's loader names them.
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
