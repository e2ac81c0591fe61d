"""Training a discrete choice by the score-function (REINFORCE) estimator.

Hard attention (Xu et al. 2015, "Show, Attend and Tell", section 4.1) samples one
location s ~ Multinoulli(alpha) at each step; no gradient flows through the sample.
Its parameters learn from the gradient of the expected log-likelihood, estimated as
(R - b) * d log p(s) / dW, with R the caption's log-likelihood (here the negative of
the cross-entropy loss the spec names, per token, as one reward for the batch) and b a
moving-average baseline (b <- decay * b + (1 - decay) * R, Xu et al.'s 0.9), which
lowers the variance without biasing the estimate. The entropy term of their
equation 12 is left out. `reinforce(logp, reward_loss)` is the surrogate loss whose
gradient is that estimate: -(R - b) * mean(logp), with R and b constants.
"""
from __future__ import annotations

from .registry import Attr, Ctx, defop, is_float, prob


def _baseline(ctx: Ctx):
    return {"baseline": ((1,), "zeros", "buffer")}


@defop("reinforce", ["logp", "reward_loss"], (Attr("decay", "float", 0.9, check=prob,
                                                  doc="of the baseline's moving average"),),
       kind="loss", params=_baseline, inits=("zeros",), vjp="kernel", grad_wrt=(0,))
def reinforce(ctx: Ctx):
    """REINFORCE surrogate -(R - b) * mean(logp) with reward R = -reward_loss and a moving-average
    baseline b (a buffer): its gradient trains the log-probabilities `logp` of sampled choices
    (e.g. hard attention's locations, [N, T]). No gradient flows into reward_loss."""
    lp, r = ctx.inputs
    if not is_float(lp.dtype):
        ctx.fail(f"'logp' must be log-probabilities (a float tensor), got {lp.dtype}", 0)
    if r.shape != () or not is_float(r.dtype):
        ctx.fail("'reward_loss' must be a scalar loss, e.g. the cross-entropy of the captions", 1)
    return [((), lp.dtype)]
