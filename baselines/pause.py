"""Pause tokens (spec section 3; paper section 3.3 and Fig. 6f): NTP + Pause and KD + Pause.

One learnable vector, shared by every position, is interleaved after every token at the layer
where CoCoMix interleaves its concepts (`concept.insert_layer` student blocks), so the upper
blocks see 2T positions and the compute matches CoCoMix's; the LM head reads the pause slots
(the slot after token t predicts token t+1), exactly as CoCoMix reads its concept slots. The
model side is `slot="pause"` of `cocomix.model` (shared with CoCoMix's interleaving); the
losses are NTP's and KD's unchanged.

Paper gaps (spec section 6, question 5), with our choices: the vector is shared across positions
and read out at the pause slot (`pause.readout: pause`; `token` reads token t's own slot instead,
the pause slots then being extra positions for later tokens: README, "Pause read-out"); the width
is the NTP/KD width (the pause vector adds d parameters, so that width is what matches CoCoMix's
active parameters; `config/paper.yaml`); KD + Pause uses the same `kd.lam` as KD.
"""

import dataclasses

from baselines.kd import KD
from baselines.ntp import NTP


class PauseSlot:
    """Mixin: build the backbone with a pause slot after `concept.insert_layer` blocks."""

    uses = ("concept.insert_layer", "pause")

    def model_config(self, cfg, vocab_size: int, eos_id: int):
        # replace() re-runs the config's own validation (0 < insert_layer < n_layer).
        return dataclasses.replace(super().model_config(cfg, vocab_size, eos_id), slot="pause",
                                   insert_layer=cfg.concept.insert_layer, pause_readout=cfg.pause.readout)


class Pause(PauseSlot, NTP):
    name = "pause"


class KDPause(PauseSlot, KD):
    name = "kd_pause"
    uses = PauseSlot.uses + KD.uses
