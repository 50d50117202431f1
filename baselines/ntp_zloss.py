"""NTP with z-loss (PaLM, Chowdhery et al. 2022, section 5): a toy loss-only method.

    loss = CE(x_{t+1}) + coef * mean_t (log Z_t)^2,    log Z_t = logsumexp of the logits at t

The auxiliary term keeps the softmax normaliser near 1 (log Z near 0), which PaLM found stabilises
training; coef = 1e-4 as in PaLM. It shows what adding a method takes: this one file.
"""

from cocomix.methods.base import Batch, Method, register


@register
class NTPZLoss(Method):
    name = "ntp_zloss"
    description = "next-token prediction with a z-loss on the log-partition function"
    coef = 1e-4

    def loss(self, model, batch: Batch):
        out = model(input_ids=batch.input_ids, labels=batch.input_ids, use_cache=False)
        z_loss = out.logits[:, :-1].float().logsumexp(-1).pow(2).mean()  # positions with a CE target
        return out.loss + self.coef * z_loss, {"ntp_loss": out.loss.detach(), "z_loss": z_loss.detach()}
