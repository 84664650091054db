"""Router: top-k selection (greedy, group-limited, noaux_tc), weights, bias updates, balance losses."""

import math

import pytest
import torch

from moray.model import preset
from moray.model.router import Router, Routing, balance_losses, contiguous_device_map, load_entropy

E = 8


def make_router(**overrides) -> Router:
    """A router over 8 experts whose logits are its input (hidden_size = E, weight = identity)."""
    cfg = preset("tiny", hidden_size=E, n_routed_experts=E, **overrides)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


def random_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, E, generator=torch.Generator().manual_seed(seed)) * 2


def chosen(routing: Routing) -> list[set[int]]:
    return [set(row) for row in routing.experts.tolist()]


def test_greedy_picks_the_k_largest_softmax_scores():
    router = make_router(num_experts_per_tok=3)
    logits = random_logits(64)
    r = router(logits)
    probs = logits.softmax(dim=-1)
    assert chosen(r) == [set(row) for row in probs.topk(3, dim=-1).indices.tolist()]
    assert torch.allclose(r.weights, probs.gather(1, r.experts))
    assert torch.allclose(r.affinity, probs.gather(1, r.experts))
    assert torch.allclose(r.scores, probs) and torch.allclose(r.logits, logits)
    assert r.experts.shape == (64, 3) and r.experts.dtype == torch.long


def test_router_math_is_float32_and_weights_follow_the_input_dtype():
    router = make_router()
    r = router(random_logits(4).bfloat16())
    assert r.logits.dtype == torch.float32 and r.scores.dtype == torch.float32
    assert r.weights.dtype == torch.bfloat16


def test_router_math_stays_float32_under_autocast():
    router = make_router()
    x = random_logits(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
    assert r.logits.dtype == torch.float32 and r.scores.dtype == torch.float32
    torch.testing.assert_close(r.logits, x)  # not rounded to bf16 (2^-8 relative) on the way


def _group_limited_reference(scores: torch.Tensor, n_group: int, topk_group: int, k: int) -> list[set[int]]:
    out = []
    per = E // n_group
    for row in scores.tolist():
        group_best = [max(row[g * per : (g + 1) * per]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -group_best[g])[:topk_group]
        allowed = [e for e in range(E) if e // per in keep]
        out.append(set(sorted(allowed, key=lambda e: -row[e])[:k]))
    return out


def test_group_limited_picks_only_inside_the_best_groups():
    router = make_router(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3)
    # Groups {0,1} {2,3} {4,5} {6,7}: best scores 5, 4, 0, 3.9 -> groups 0 and 1. Greedy would take 6.
    logits = torch.tensor([[5.0, 1.0, 4.0, 0.5, 0.0, 0.0, 3.9, 3.8]])
    r = router(logits)
    assert chosen(r) == [{0, 1, 2}]
    # Weights are the (unmasked) softmax probabilities of the chosen experts.
    assert torch.allclose(r.weights, logits.softmax(-1).gather(1, r.experts))
    logits = random_logits(200, seed=1)
    r = router(logits)
    assert chosen(r) == _group_limited_reference(logits.softmax(-1), 4, 2, 3)
    groups = r.experts // 2
    assert all(len(set(g)) <= 2 for g in groups.tolist())


def test_group_score_is_the_best_expert_not_the_sum():
    router = make_router(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=2)
    # Group 1 has the larger sum (3 + 3) but group 2 the larger best expert (4): groups 0 and 2 win.
    r = router(torch.tensor([[5.0, 0.0, 3.0, 3.0, 4.0, 0.0, 0.0, 0.0]]))
    assert chosen(r) == [{0, 4}]


NOAUX = dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2, num_experts_per_tok=2)


def test_noaux_tc_groups_by_the_sum_of_their_top2():
    router = make_router(**{**NOAUX, "topk_group": 1})
    # Group 0 has the best single expert, group 1 the best top-2 sum: group 1 is kept.
    r = router(torch.tensor([[3.0, -5.0, 1.0, 1.0, 2.0, -5.0, -5.0, -5.0]]))
    assert chosen(r) == [{2, 3}]


def test_noaux_tc_bias_steers_selection_but_not_weights():
    router = make_router(**NOAUX)
    logits = random_logits(32, seed=2)
    with torch.no_grad():
        router.e_score_correction_bias[7] = 10.0  # expert 7 (and its group) always chosen
    r = router(logits)
    assert all(7 in s for s in chosen(r))
    sig = logits.sigmoid()
    assert torch.allclose(r.affinity, sig.gather(1, r.experts))
    assert torch.allclose(r.weights, sig.gather(1, r.experts))  # no bias in the weights
    assert (r.weights < 1).all()  # a biased weight would be > 10
    assert torch.allclose(r.scores.sum(-1), torch.ones(32))  # normalized for the balance losses
    assert torch.allclose(r.scores, sig / sig.sum(-1, keepdim=True))


def test_noaux_tc_with_negative_biases_still_respects_the_groups():
    """Over-loaded experts get negative biases; experts of dropped groups must stay unselectable."""
    router = make_router(**NOAUX)
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.linspace(-3.0, -1.0, E))
    logits = random_logits(64, seed=3)
    r = router(logits)
    choice = logits.sigmoid() + router.e_score_correction_bias
    for row, experts in zip(choice.tolist(), r.experts.tolist()):
        top2 = [sum(sorted(row[g * 2 : g * 2 + 2])[-2:]) for g in range(4)]
        keep = set(sorted(range(4), key=lambda g: -top2[g])[:2])
        assert {e // 2 for e in experts} <= keep
        allowed = [e for e in range(E) if e // 2 in keep]
        assert set(experts) == set(sorted(allowed, key=lambda e: -row[e])[:2])


def test_update_bias_moves_toward_balance():
    router = make_router(**NOAUX, bias_update_speed=0.01)
    load = torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])  # mean 5: expert 0 over-, expert 1 under-loaded
    router.update_bias(load)
    want = torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0])
    assert torch.allclose(router.e_score_correction_bias, want)
    router.update_bias(load)
    assert torch.allclose(router.e_score_correction_bias, 2 * want)
    assert router.e_score_correction_bias.requires_grad is False
    assert "e_score_correction_bias" in router.state_dict()  # checkpointed, HF's name


def test_update_bias_is_a_noop_for_softmax_routers():
    router = make_router()
    assert router.e_score_correction_bias is None
    router.update_bias(torch.tensor([10, 0, 5, 5, 5, 5, 5, 5]))
    assert "e_score_correction_bias" not in router.state_dict()


def test_routed_scaling_factor_multiplies_the_weights():
    logits = random_logits(16, seed=4)
    plain = make_router(num_experts_per_tok=3)(logits)
    scaled = make_router(num_experts_per_tok=3, routed_scaling_factor=2.5)(logits)
    assert torch.equal(scaled.experts, plain.experts)
    assert torch.allclose(scaled.weights, 2.5 * plain.weights)
    assert torch.allclose(scaled.affinity, plain.affinity)  # the drop priority is unscaled


@pytest.mark.parametrize("sigmoid", [False, True])
def test_norm_topk_prob_weights_sum_to_the_scaling_factor(sigmoid):
    extra = NOAUX if sigmoid else {}
    router = make_router(
        **{**extra, "num_experts_per_tok": 3}, norm_topk_prob=True, routed_scaling_factor=2.5
    )
    logits = random_logits(16, seed=5)
    r = router(logits)
    assert torch.allclose(r.weights.sum(-1), torch.full((16,), 2.5))
    assert torch.allclose(r.weights, 2.5 * r.affinity / r.affinity.sum(-1, keepdim=True))


# ---- balance losses -----------------------------------------------------------------------------------

SCORES = torch.tensor(
    [
        [0.4, 0.3, 0.2, 0.1],
        [0.1, 0.2, 0.3, 0.4],
        [0.5, 0.1, 0.3, 0.1],
        [0.25, 0.25, 0.25, 0.25],
    ]
)
EXPERTS = torch.tensor([[0, 1], [3, 2], [0, 2], [0, 3]])


def hand_routing(scores=SCORES, experts=EXPERTS, logits=None) -> Routing:
    logits = scores.log() if logits is None else logits
    w = scores.gather(1, experts)
    return Routing(experts=experts, weights=w, affinity=w, scores=scores, logits=logits)


def test_balance_losses_by_hand():
    """N=4 tokens, E=4 experts, k=2. counts [3, 1, 2, 2] -> f = counts * E/(kN) = [1.5, .5, 1, 1];
    P = column means = [.3125, .2125, .2625, .2125]."""
    r = hand_routing()
    # Devices {0, 2} and {1, 3}: f' = [1.25, .75], P' = [.575, .425].
    # Tokens reaching device 0: 4, device 1: 3 -> f'' = D/(M N) * [4, 3].
    got = balance_losses(r, torch.tensor([0, 1, 0, 1]), n_devices=2, max_devices_per_token=1)
    assert got["expert_balance"].item() == pytest.approx(1.5 * 0.3125 + 0.5 * 0.2125 + 0.2625 + 0.2125)
    assert got["expert_balance"].item() == pytest.approx(1.05)
    assert got["device_balance"].item() == pytest.approx(1.25 * 0.575 + 0.75 * 0.425)
    assert got["comm_balance"].item() == pytest.approx(2.0 * 0.575 + 1.5 * 0.425)
    m2 = balance_losses(r, torch.tensor([0, 1, 0, 1]), n_devices=2, max_devices_per_token=2)
    assert m2["comm_balance"].item() == pytest.approx((2.0 * 0.575 + 1.5 * 0.425) / 2)
    # Contiguous placement {0, 1}, {2, 3}: f' = [1, 1], P' = [.525, .475]; every device reached 3 times.
    cont = balance_losses(r, contiguous_device_map(4, 2), n_devices=2, max_devices_per_token=1)
    assert cont["device_balance"].item() == pytest.approx(1.0)
    assert cont["comm_balance"].item() == pytest.approx(1.5 * 0.525 + 1.5 * 0.475)
    assert cont["expert_balance"].item() == pytest.approx(1.05)


def test_balance_losses_match_a_loop_reference():
    g = torch.Generator().manual_seed(6)
    N, E_, k, D, M = 24, 8, 3, 4, 2
    logits = torch.randn(N, E_, generator=g)
    scores = logits.softmax(-1)
    experts = scores.topk(k, dim=-1).indices
    device_of = torch.tensor([3, 0, 2, 1, 1, 2, 0, 3])
    got = balance_losses(hand_routing(scores, experts, logits), device_of, D, M)
    counts = [sum(int(e == i) for row in experts.tolist() for e in row) for i in range(E_)]
    f = [c * E_ / (k * N) for c in counts]
    P = [sum(scores[t, i].item() for t in range(N)) / N for i in range(E_)]
    members = [[i for i in range(E_) if device_of[i] == d] for d in range(D)]
    f_dev = [sum(f[i] for i in m) / len(m) for m in members]
    P_dev = [sum(P[i] for i in m) for m in members]
    reach = [sum(any(device_of[e] == d for e in row) for row in experts.tolist()) for d in range(D)]
    f_comm = [D / (M * N) * c for c in reach]
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / N
    assert got["expert_balance"].item() == pytest.approx(sum(a * b for a, b in zip(f, P)), rel=1e-5)
    assert got["device_balance"].item() == pytest.approx(sum(a * b for a, b in zip(f_dev, P_dev)), rel=1e-5)
    assert got["comm_balance"].item() == pytest.approx(sum(a * b for a, b in zip(f_comm, P_dev)), rel=1e-5)
    assert got["router_z_loss"].item() == pytest.approx(z, rel=1e-5)


def test_uniform_routing_gives_balance_one_and_collapse_the_maximum():
    scores = torch.full((4, 4), 0.25)
    uniform = hand_routing(scores, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]))
    got = balance_losses(uniform, contiguous_device_map(4, 2), n_devices=2, max_devices_per_token=1)
    assert got["expert_balance"].item() == pytest.approx(1.0)
    assert got["device_balance"].item() == pytest.approx(1.0)
    assert got["comm_balance"].item() == pytest.approx(1.0)
    # Everything on experts 0 and 1 with all the probability there: E/k = 2, the largest value.
    collapsed = hand_routing(torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 4), torch.tensor([[0, 1]] * 4))
    worst = balance_losses(collapsed, contiguous_device_map(4, 2), n_devices=2, max_devices_per_token=1)
    assert worst["expert_balance"].item() == pytest.approx(2.0)
    assert worst["device_balance"].item() == pytest.approx(2.0)  # f' = [2, 0], P' = [1, 0]
    assert worst["comm_balance"].item() == pytest.approx(2.0)  # f'' = [2, 0] with D/(M N) = 1/2


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    r = hand_routing(logits.softmax(-1), torch.tensor([[0, 1], [2, 3]]), logits)
    want = (math.log(4) ** 2 + math.log(sum(math.exp(v) for v in (1, 2, 3, 4))) ** 2) / 2
    assert balance_losses(r, contiguous_device_map(4, 1), 1, 1)["router_z_loss"].item() == pytest.approx(want)


def test_balance_loss_gradient_reaches_the_router():
    router = make_router(num_experts_per_tok=2)
    x = random_logits(32, seed=7).requires_grad_(True)
    losses = balance_losses(router(x), contiguous_device_map(E, 2), 2, 1)
    sum(losses.values()).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_load_entropy_and_device_map():
    assert load_entropy(torch.tensor([4, 4, 4, 4])) == pytest.approx(1.0)
    assert load_entropy(torch.tensor([8, 0, 0, 0])) == pytest.approx(0.0)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert load_entropy(torch.tensor([3, 1])) == pytest.approx(h)
    assert 0.0 < load_entropy(torch.tensor([5, 1, 0, 2])) < 1.0
    assert contiguous_device_map(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert contiguous_device_map(8, 1).tolist() == [0] * 8


def test_a_device_without_experts_does_not_poison_the_losses():
    r = hand_routing()
    got = balance_losses(r, torch.tensor([0, 0, 2, 2]), n_devices=3, max_devices_per_token=1)
    assert all(torch.isfinite(v) for v in got.values())
    same = balance_losses(r, torch.tensor([0, 0, 1, 1]), n_devices=2, max_devices_per_token=1)
    assert got["device_balance"].item() == pytest.approx(same["device_balance"].item())
