"""Pause tokens (spec section 3; paper section 3.3 and Fig. 6f): NTP + Pause and KD + Pause.

One learnable vector, shared by every position, is interleaved after every token at the layer
where CoCoMix interleaves its concepts (`concept.insert_layer` student blocks), so the upper
blocks see 2T positions and the compute matches CoCoMix's; the LM head reads the pause slots
(the slot after token t predicts token t+1), exactly as CoCoMix reads its concept slots. The
model side is the `pause` slot module of `cocomix/slots.py`; the losses are NTP's and KD's unchanged.

Paper gaps (spec section 6, question 5), with our choices: the vector is shared across positions
and read out at the pause slot (`pause.readout: pause`; `token` reads token t's own slot instead,
the pause slots then being extra positions for later tokens: docs/baselines.md, "Pause read-out"); the width
is the NTP/KD width (the pause vector adds d parameters, so that width is what matches CoCoMix's
active parameters; `config/paper.yaml`); KD + Pause uses the same `kd.lam` as KD.
"""

from baselines.kd import KD
from baselines.ntp import NTP
from cocomix.config import SweepParam
from cocomix.methods.base import register


class PauseSlot:
    """Mixin: the backbone with the pause slot module (cocomix/slots.py) after `concept.insert_layer` blocks."""

    reads = ("concept.insert_layer", "pause")
    slot = "pause"

    def slot_options(self, cfg) -> dict:
        return {"readout": cfg.pause.readout}

    def tune_space(self, cfg) -> dict:
        """The learning rate and warm-up (and KD's knobs for kd_pause), and where the pauses enter. The
        number of pauses is not a knob: one pause slot follows every token, as CoCoMix's concept slot."""
        return {**super().tune_space(cfg), "concept.insert_layer": SweepParam("int", 1, max(1, cfg.model.n_layer - 1))}


@register
class Pause(PauseSlot, NTP):
    name = "pause"
    description = "pause tokens: a learned vector interleaved after every token, giving the upper blocks extra positions"


@register
class KDPause(PauseSlot, KD):
    name = "kd_pause"
    description = "knowledge distillation and pause tokens together"
    reads = PauseSlot.reads + KD.reads
