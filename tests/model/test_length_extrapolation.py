"""Length extrapolation: a small model trained on L-token sequences, evaluated at 8L with YaRN
switched on (the same weights) and without it, for plain RoPE and for the per-head-base and
learned-wavelength extras.

The task needs position: each token copies the one LAG places back (90% of the time), so the model
must attend at a fixed offset, and past L it meets offsets and angles it never trained on. The
stated bound: with YaRN (factor 8, beta_fast 4, beta_slow 1: the fast/slow thresholds scaled to
a 128-token original context, as DeepSeek's 32/1 suit 4,096) the perplexity at 8L stays within 3x
the model's own at L; without YaRN it rises more than 5x. Measured here: plain RoPE 9.4 at L,
86 at 8L without YaRN, 23 with; per-head bases 3.5, 110, 5.3; learned wavelengths 2.6, 218, 2.4.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moray.model import Transformer, preset
from tests.fixtures.markov import lagged_copies

L, LAG, FACTOR, STEPS = 128, 8, 8, 400
YARN = {
    "type": "yarn",
    "factor": FACTOR,
    "original_max_position_embeddings": L,
    "beta_fast": 4,
    "beta_slow": 1,
}


def perplexity(model: Transformer, length: int) -> float:
    x = lagged_copies(4, length + 1, LAG, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x[:, :-1]).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).exp().item()


@pytest.mark.parametrize(
    "extras",
    [{}, {"rope_per_head_base": True}, {"rope_learned_wavelengths": True}],
    ids=["rope", "per_head", "learned"],
)
def test_yarn_keeps_perplexity_at_8x_the_training_length(extras):
    torch.manual_seed(0)
    cfg = preset(
        "tiny", max_position_embeddings=FACTOR * L + 1, qk_rope_head_dim=32, qk_nope_head_dim=16, **extras
    )
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = lagged_copies(8, L + 1, LAG, g)
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad()
        (loss + out.aux_loss).backward()
        opt.step()
    model.eval()
    yarn = Transformer(dataclasses.replace(cfg, rope_scaling=YARN)).eval()
    yarn.load_state_dict(model.state_dict())

    at_length, beyond, beyond_yarn = (
        perplexity(model, L),
        perplexity(model, FACTOR * L),
        perplexity(yarn, FACTOR * L),
    )
    assert beyond > 5 * at_length, (at_length, beyond)  # the problem is there without YaRN
    assert beyond_yarn < 3 * at_length, (at_length, beyond_yarn)
