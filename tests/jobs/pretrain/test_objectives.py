"""The auxiliary objectives (next-sentence, span-boundary, code-execution): what they do to a batch,
that each changes the loss by its weighted term, and that each trains its head. No Ray."""

import pytest
import torch

from moray.jobs.pretrain.objectives import IGNORE, AuxTargets, ObjectivesSection, prepare
from moray.jobs.pretrain.optim import Schedule, build_optimizer
from moray.jobs.pretrain.step import ClipSettings, train_step
from moray.model import Transformer, preset
from moray.platform.config import ConfigError, from_dict

PAD = 0
TOPICS, TOPIC_VOCAB = 8, 16


def topic_sequences(n: int, width: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, width) sequences, each drawn from its own topic's block of TOPIC_VOCAB tokens: whether
    two halves belong together, and which block a masked token comes from, can be learned."""
    topics = torch.randint(0, TOPICS, (n,), generator=g)
    seqs = 3 + TOPIC_VOCAB * topics[:, None] + torch.randint(0, TOPIC_VOCAB, (n, width), generator=g)
    return seqs, topics


def objectives(name: str, **settings) -> ObjectivesSection:
    return from_dict(ObjectivesSection, {name: {"enabled": True, **settings}})


def test_next_sentence_pairs_replace_tails_with_another_sequence_and_drop_the_seam_target():
    g = torch.Generator().manual_seed(0)
    seqs, _ = topic_sequences(40, 33, g)
    inputs, targets, aux = prepare(objectives("nsp"), seqs, None, PAD, torch.Generator().manual_seed(1))
    chosen = aux.nsp != IGNORE
    assert int(chosen.sum()) == 4  # 10% of 40 sequences
    for i in range(40):
        row = torch.cat([inputs[i], targets[i, -1:]])
        changed = (row != seqs[i]).nonzero()
        if not chosen[i] or aux.nsp[i] == 1:
            assert changed.numel() == 0 and (targets[i] != IGNORE).all()
        else:  # a tail from another sequence, from the cut on; the target predicting the seam ignored
            cut = int(changed.min())
            assert 33 // 4 <= cut <= 3 * 33 // 4
            assert any(torch.equal(row[cut:], seqs[j, cut:]) for j in range(40) if j != i)
            assert (targets[i] == IGNORE).nonzero().flatten().tolist() == [cut - 1]
    assert {0, 1} <= set(aux.nsp[chosen].tolist()) | {0, 1}
    again = prepare(objectives("nsp"), seqs, None, PAD, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[2].nsp, aux.nsp)  # seeded: a resume repeats it


def test_span_masking_covers_the_fraction_in_disjoint_spans_with_unmasked_boundaries():
    g = torch.Generator().manual_seed(0)
    seqs, _ = topic_sequences(6, 201, g)
    inputs, targets, aux = prepare(objectives("span_boundary"), seqs, None, PAD, g)
    assert torch.equal(targets, seqs[:, 1:])  # the LM targets stay the original tokens
    assert torch.equal(aux.tokens, seqs[:, :-1])
    T = inputs.shape[1]
    for row in range(6):
        spans = aux.spans[aux.spans[:, 0] == row]
        masked = torch.zeros(T, dtype=torch.bool)
        for _, s, e in spans.tolist():
            assert 1 <= s < e < T and e - s <= 10
            assert not masked[s - 1 : e + 1].any()  # disjoint, boundaries not masked
            masked[s:e] = True
        assert int(masked.sum()) >= round(0.05 * T)
        assert torch.equal(inputs[row] == PAD, masked)
    # a micro-batch's share: its rows, renumbered
    part = aux.rows(2, 4)
    assert torch.equal(part.spans[:, 1:], aux.spans[(aux.spans[:, 0] >= 2) & (aux.spans[:, 0] < 4)][:, 1:])
    assert set(part.spans[:, 0].tolist()) == {0, 1} and torch.equal(part.tokens, aux.tokens[2:4])


def test_objective_settings_are_checked():
    with pytest.raises(ConfigError, match="objectives.nsp.fraction"):
        objectives("nsp", fraction=0)
    with pytest.raises(ConfigError, match="objectives.span_boundary.weight"):
        objectives("span_boundary", weight=-1)
    with pytest.raises(ValueError, match="code-execution labels"):
        prepare(objectives("code_exec"), torch.zeros(2, 9, dtype=torch.long), None, PAD, torch.Generator())
    with pytest.raises(ValueError, match="aux_heads"):
        preset("tiny", aux_heads=["nsp", "mlm"])


def test_heads_leave_the_language_model_alone():
    """Off by default (HF parity), and a model with every head gives the same logits as without."""
    assert preset("tiny").aux_heads == [] and not hasattr(Transformer(preset("tiny")).aux_heads, "nsp")
    torch.manual_seed(0)
    plain = Transformer(preset("tiny"))
    with_heads = Transformer(preset("tiny", aux_heads=["nsp", "span_boundary", "code_exec"]))
    with_heads.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(3, 512, (2, 12))
    torch.testing.assert_close(with_heads(ids).logits, plain(ids).logits, rtol=0, atol=0)
    assert with_heads(ids).hidden.shape == (2, 12, 64)


def _code_labels(seqs: torch.Tensor, topics: torch.Tensor) -> torch.Tensor:
    """A label at each sequence's last position: does its topic "run" (even topics do)."""
    labels = torch.full_like(seqs, -1)
    labels[:, -2] = (topics % 2 == 0).long()  # the last input position
    return labels


# Telling whether two halves belong together is the slowest to learn: every sequence made a pair,
# and more steps (measured 0.73 -> 0.43 over 100 steps; span-boundary 5.5 -> 3.4 and code-execution
# 0.37 -> 0.01 over 40).
SETTINGS = {
    "nsp": dict(steps=100, lr=3e-3, settings={"fraction": 1.0, "weight": 1.0}),
    "span_boundary": dict(steps=40, lr=1e-2, settings={}),
    "code_exec": dict(steps=40, lr=1e-2, settings={}),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_objective_adds_its_weighted_loss_and_trains_its_head(name):
    run = SETTINGS[name]
    steps, b, width = run["steps"], 16, 33
    cfg = objectives(name, **{"weight": 0.5, **run["settings"]})
    g = torch.Generator().manual_seed(0)
    batches = [topic_sequences(b, width, g) for _ in range(steps)]

    torch.manual_seed(0)
    model = Transformer(preset("tiny", capacity_factor=None, aux_heads=[name]))
    opt = build_optimizer(model, "adamw", run["lr"], 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(steps, 2, "constant", 1.0))
    head = {n: p.detach().clone() for n, p in model.aux_heads.named_parameters()}
    curve = []
    for k, (seqs, topics) in enumerate(batches):
        labels = _code_labels(seqs, topics) if name == "code_exec" else None
        inputs, targets, aux = prepare(cfg, seqs, labels, PAD, torch.Generator().manual_seed(k))
        stats = train_step(model, opt, sched, [(inputs, targets, aux)], 0.0, ClipSettings(), objectives=cfg)
        key = f"{name}_loss"
        # L_total = L_lm + lambda * L_aux: the objective moves the loss by exactly its weighted term
        want = stats.losses["lm_loss"] + cfg.weight(name) * stats.losses[key]
        assert stats.losses["loss"] == pytest.approx(want, rel=1e-5)
        curve.append(stats.losses[key])
    first, last = sum(curve[:10]) / 10, sum(curve[-10:]) / 10
    # chance: ln 2 for the binary heads; ln(vocab) for span tokens, ln(16) once the topic is known
    assert last < 0.75 * first, (name, curve)
    assert all(not torch.equal(p, head[n]) for n, p in model.aux_heads.named_parameters())


def test_targets_split_into_micro_batches_add_up_to_the_whole():
    g = torch.Generator().manual_seed(0)
    seqs, topics = topic_sequences(8, 33, g)
    cfg = from_dict(
        ObjectivesSection,
        {"nsp": {"enabled": True}, "span_boundary": {"enabled": True}, "code_exec": {"enabled": True}},
    )
    _, _, aux = prepare(cfg, seqs, _code_labels(seqs, topics), PAD, g)
    parts = [aux.rows(m, m + 2) for m in range(0, 8, 2)]
    assert sum(len(p.spans) for p in parts) == len(aux.spans)
    assert torch.equal(torch.cat([p.nsp for p in parts]), aux.nsp)
    assert torch.equal(torch.cat([p.code_exec for p in parts]), aux.code_exec)
    assert isinstance(parts[0], AuxTargets)
