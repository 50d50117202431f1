"""Knowledge distillation (spec section 3, "KD"; paper App. A).

    loss = CE(student, x_{t+1}) + lam * tau^2 * KL( softmax(teacher / tau) || softmax(student / tau) )

Forward KL from the frozen teacher to the student over the full vocabulary at every position,
lam = `kd.lam` (0.1, the paper's "consistently strong" value) and tau = `kd.temperature` (1; the
paper states none). The tau^2 factor (Hinton et al. 2015) keeps the KL gradients' scale independent
of tau, so lam means the same thing at every temperature; at tau = 1 it is 1.

The teacher is the model the concepts come from (`teacher.path`, loaded by `cocomix.teacher`),
run online without gradients, in bf16 on GPU. It must share the student's tokenizer: the KL
compares distributions over the same token ids. Either model's vocabulary may be padded
(`model.vocab_multiple`; padding ids have -inf logits): the KL runs over the real vocabulary only,
which is exactly the KL of the unpadded models and avoids 0 * (-inf - -inf) = NaN in padded columns.

The KL covers all T positions, including the last one, which has no CE target: the teacher's
distribution there is as valid a target as anywhere else. The CE term is the backbone's own
(the exact tensor NTP minimises), so `kd.lam=0` reproduces NTP bit for bit (tested).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from cocomix.config import ConfigError, SweepParam
from cocomix.data.shards import check_tokenizer_matches
from cocomix.device import autocast
from cocomix.flops import forward_flops_per_token
from cocomix.methods.base import Batch, Method, register
from cocomix.teacher import load_teacher, teacher_dir, teacher_training_flops


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
          vocab_size: int | None = None) -> torch.Tensor:
    """tau^2 * mean over positions of KL(p_teacher || p_student), p = softmax(logits / tau).

    Logits: (B, T, V_student) and (B, T, V_teacher), V >= vocab_size; only the first `vocab_size` ids
    (the real vocabulary; default: all, then both V must agree) are compared. Padding columns hold -inf
    and probability 0, so dropping them changes neither softmax. Computed in fp32 whatever the autocast
    dtype (log-softmax over 50k entries).
    """
    if vocab_size is not None:
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; pass the real vocab_size")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)  # (B, T)
    return kl.mean() * temperature**2


def load_kd_teacher(cfg, device: torch.device, student_vocab_size: int):
    """The frozen teacher, checked against the student's real vocabulary (`real_vocab_size`: the
    tokenizer's, whatever either model's padding) and context length."""
    # Loading builds (and initialises) a model; keep that off the student's RNG stream, so dropout
    # masks, and hence KD with lam=0 versus NTP, do not depend on whether a teacher was loaded.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        teacher = load_teacher(cfg, device)
    if teacher.config.real_vocab_size != student_vocab_size:
        raise ConfigError(
            f"config key 'teacher.path': teacher {teacher_dir(cfg)} has vocab_size {teacher.config.real_vocab_size} "
            f"but the student has {student_vocab_size}; KD needs the teacher to share the student's tokenizer"
        )
    # Same size is not enough: the ids must mean the same tokens. Our checkpoints and GPT-2 folders
    # carry their tokenizer; compare it with the one the shards were made with.
    path = teacher_dir(cfg)
    if (path / "tokenizer.json").is_file():
        check_tokenizer_matches(cfg.data_dir, path)
    if teacher.config.n_positions < cfg.train.block_size:
        raise ConfigError(
            f"config key 'teacher.path': teacher {teacher_dir(cfg)} has n_positions {teacher.config.n_positions} "
            f"< train.block_size={cfg.train.block_size}"
        )
    return teacher


@register
class KD(Method):
    name = "kd"
    description = ("next-token prediction plus knowledge distillation from a frozen teacher LM (KL to its "
                   "next-token distribution)")
    reads = ("teacher", "kd")

    def artifacts(self, cfg) -> frozenset[str]:
        return frozenset({"teacher"})

    def tune_space(self, cfg) -> dict:
        """The learning rate and warm-up, lambda_KD (0.02 to 1, log) and the temperature (0.5 to 4, log)."""
        return {**super().tune_space(cfg), "kd.lam": SweepParam("float", 0.02, 1.0, log=True),
                "kd.temperature": SweepParam("float", 0.5, 4.0, log=True)}

    def setup(self, trainer) -> None:
        self.cfg = cfg = trainer.cfg
        self.lam, self.temperature = cfg.kd.lam, cfg.kd.temperature
        self.seq_len = cfg.train.block_size
        self.vocab_size = trainer.model.config.real_vocab_size  # the KL's ids: padding columns are left out
        self.teacher = load_kd_teacher(cfg, trainer.device, self.vocab_size)
        # Spec section 3: the teacher runs in bf16 on GPU whatever the student's precision.
        self.teacher_autocast = autocast(trainer.device, "auto")

    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.teacher_autocast:
            return self.teacher(input_ids=input_ids, use_cache=False).logits  # (B, T, V)

    def loss(self, model, batch: Batch):
        out = model(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False)
        kd = kd_kl(out.logits, self.teacher_logits(batch.input_ids), self.temperature, self.vocab_size)
        return out.loss + self.lam * kd, {"ntp_loss": out.loss.detach(), "kd_loss": kd.detach()}

    def teacher_flops_per_token(self) -> float:
        """One teacher forward per student token (no backward: the teacher is frozen)."""
        return float(forward_flops_per_token(self.teacher, self.seq_len))

    def one_off_flops(self) -> dict[str, tuple[float | None, str]]:
        return {"teacher_training": teacher_training_flops(self.cfg)}
