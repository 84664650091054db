"""DeepSeekMoE layer: dropless equals a per-token loop, capacity drops, statistics, capacity control,
and the balance losses as the Transformer reports them."""

import math

import pytest
import torch
import torch.nn.functional as F

from moray.model import CapacityController, Transformer, preset
from moray.model.moe import MoE, RouterStats, capacity_mask
from moray.model.router import balance_losses
from tests.model.test_mla import build, ids_for, tiny

H, I = 16, 8  # noqa: E741


def moe_config(**overrides):
    base = dict(
        hidden_size=H, moe_intermediate_size=I, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1
    )
    return preset("tiny", **{**base, **overrides})


def make_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(moe_config(**overrides))
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if not name.endswith(("beta", "activation_scale")):
                p.normal_(0.0, 0.3)
    return moe


def swiglu(x, gate_w, up_w, down_w, beta=1.0, scale=1.0):
    g = gate_w @ x
    return down_w @ (g * torch.sigmoid(beta * g) * (up_w @ x) * scale)


def reference(moe: MoE, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over tokens and their experts with the layer's own weights and routing."""
    flat = x.reshape(-1, x.shape[-1])
    routing = moe.gate(flat)
    ex = moe.experts
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(routing.experts.shape[1]):
            if keep is not None and not keep[t, j]:
                continue
            e = int(routing.experts[t, j])
            gate_w, up_w = ex.gate_up_proj[e, :I], ex.gate_up_proj[e, I:]
            beta = 1.0 if ex.beta is None else ex.beta[e]
            scale = 1.0 if ex.activation_scale is None else ex.activation_scale[e]
            out[t] += routing.weights[t, j] * swiglu(flat[t], gate_w, up_w, ex.down_proj[e], beta, scale)
        if moe.shared_experts is not None:
            s = moe.shared_experts
            beta = 1.0 if s.beta is None else s.beta
            out[t] += swiglu(flat[t], s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight, beta)
    return out.view_as(x)


DROPLESS = {
    "greedy": {},
    "top3_two_shared": dict(num_experts_per_tok=3, n_shared_experts=2),
    "no_shared": dict(n_shared_experts=0),
    "group_limited_scaled": dict(
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0
    ),
    "noaux_normalized": dict(
        topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True
    ),
    "learned_beta_and_scale": dict(swiglu_learned_beta=True, expert_activation_scale=True),
}


@pytest.mark.parametrize("case", sorted(DROPLESS))
@pytest.mark.parametrize("training", [False, True])
def test_dropless_equals_a_per_token_loop(case, training):
    moe = make_moe(**DROPLESS[case]).train(training)
    if moe.experts.beta is not None:
        with torch.no_grad():
            moe.experts.beta.uniform_(0.5, 2.0)
            moe.experts.activation_scale.uniform_(0.5, 2.0)
            moe.shared_experts.beta.fill_(1.7)
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(1))
    got = moe(x)
    with torch.no_grad():
        want = reference(moe, x)
    assert got.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-5
    assert moe.last_stats.dropped == 0 and moe.last_stats.capacity is None


def test_experts_with_no_tokens_are_fine():
    moe = make_moe(num_experts_per_tok=1)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[3, 0] = 10.0
    x = torch.randn(5, H).abs()  # all tokens prefer expert 3
    out = moe(x)
    assert moe.last_stats.tokens_per_expert.tolist() == [0, 0, 0, 5, 0, 0, 0, 0]
    assert (out - reference(moe, x)).abs().max().item() <= 1e-5


def one_hot_router_moe(k: int = 1, factor: float | None = 1.0, n: int = 8):
    """Every token prefers expert 0, with affinity increasing in x[:, 0] (all distinct)."""
    moe = make_moe(num_experts_per_tok=k, n_routed_experts=4, capacity_factor=factor)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 5.0
        moe.gate.weight[1, 1] = 0.1  # a distinct second choice when k = 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, H, generator=g)
    x[:, 0] = torch.randperm(n, generator=g).float() * 0.5 + 0.5
    x[:, 1] = x[:, 1].abs()
    return moe, x


def test_capacity_drops_the_lowest_affinity_pairs_of_an_oversubscribed_expert():
    moe, x = one_hot_router_moe(k=1, factor=1.0, n=8)
    moe.train()
    out = moe(x)
    cap = math.ceil(1.0 * 8 * 1 / 4)
    stats = moe.last_stats
    assert stats.capacity == cap == 2
    assert stats.tokens_per_expert.tolist() == [8, 0, 0, 0]
    assert stats.dropped == 6 and stats.pairs == 8 and stats.drop_rate == pytest.approx(0.75)
    kept_tokens = set(x[:, 0].topk(cap).indices.tolist())  # the two largest affinities
    keep = torch.tensor([[t in kept_tokens] for t in range(8)])
    with torch.no_grad():
        want = reference(moe, x, keep)
        shared_only = reference(moe, x, torch.zeros(8, 1, dtype=torch.bool))
    assert (out - want).abs().max().item() <= 1e-5
    for t in range(8):  # a dropped token gets the shared experts only
        same = (out[t] - shared_only[t]).abs().max().item() <= 1e-6
        assert same == (t not in kept_tokens)


def test_capacity_with_two_experts_per_token():
    moe, x = one_hot_router_moe(k=2, factor=1.0, n=8)
    moe.train()
    out = moe(x)
    cap = math.ceil(8 * 2 / 4)  # 4
    routing = moe.gate(x)
    assert (routing.experts == 0).any(-1).all() and (routing.experts == 1).any(-1).all()
    keep = capacity_mask(routing.experts, routing.affinity, 4, cap)
    assert moe.last_stats.dropped == 8  # 4 of 8 dropped on expert 0 and on expert 1
    kept0 = {t for t in range(8) if keep[t][routing.experts[t] == 0].item()}
    assert kept0 == set(x[:, 0].topk(cap).indices.tolist())
    with torch.no_grad():
        assert (out - reference(moe, x, keep)).abs().max().item() <= 1e-5


def test_capacity_mask_keeps_each_experts_best_pairs():
    g = torch.Generator().manual_seed(3)
    N, k, n_exp, cap = 60, 2, 4, 12
    experts = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(N)])
    affinity = torch.rand(N, k, generator=g)
    keep = capacity_mask(experts, affinity, n_exp, cap)
    assert keep.shape == (N, k) and keep.dtype == torch.bool
    for e in range(n_exp):
        pairs = (experts == e).nonzero().tolist()
        kept = {(t, j) for t, j in pairs if keep[t, j]}
        assert len(kept) == min(len(pairs), cap)
        best = sorted(pairs, key=lambda p: -affinity[p[0], p[1]].item())[:cap]
        assert kept == {tuple(p) for p in best}
    # Room for everyone: nothing dropped.
    assert capacity_mask(experts, affinity, n_exp, N).all()


def test_eval_is_dropless_even_with_a_capacity_factor():
    moe, x = one_hot_router_moe(k=1, factor=1.0, n=8)
    moe.eval()
    out = moe(x)
    assert moe.last_stats.dropped == 0 and moe.last_stats.capacity is None
    assert moe.last_losses is None
    with torch.no_grad():
        assert (out - reference(moe, x)).abs().max().item() <= 1e-5


def test_router_stats():
    moe = make_moe(num_experts_per_tok=3, capacity_factor=1.0).train()
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(4))
    moe(x)
    s = moe.last_stats
    assert int(s.tokens_per_expert.sum()) == 40 * 3 == s.pairs
    cap = math.ceil(1.0 * 40 * 3 / 8)
    assert s.capacity == cap
    assert s.dropped == int((s.tokens_per_expert - cap).clamp_min(0).sum())
    assert 0.0 <= s.entropy <= 1.0
    d = s.as_dict()
    assert d["dropped"] == s.dropped and d["capacity"] == cap and sum(d["tokens_per_expert"]) == 120
    assert d["drop_rate"] == pytest.approx(s.dropped / 120)
    uniform = RouterStats(torch.tensor([5, 5, 5, 5]), dropped=0, pairs=20, capacity=None)
    assert uniform.entropy == pytest.approx(1.0) and uniform.max_min_ratio == 1.0
    skewed = RouterStats(torch.tensor([12, 0, 6, 2]), dropped=3, pairs=20, capacity=5)
    assert skewed.max_min_ratio == 12.0 and skewed.drop_rate == pytest.approx(0.15)
    assert 0.0 < skewed.entropy < 1.0


def test_shared_experts_width():
    moe = make_moe(n_shared_experts=3)
    assert moe.shared_experts.gate_proj.weight.shape == (3 * I, H)
    assert moe.experts.gate_up_proj.shape == (8, 2 * I, H) and moe.experts.down_proj.shape == (8, H, I)


# ---- capacity controller --------------------------------------------------------------------------------


def test_capacity_controller_moves_toward_the_target():
    c = CapacityController(factor=1.5, target_drop_rate=0.01, min_factor=1.0, max_factor=2.0, gain=2.0)
    assert c.update(0.03) == pytest.approx(1.5 * math.exp(2.0 * 0.02))  # too many drops: up
    before = c.factor
    assert c.update(0.0) == pytest.approx(before * math.exp(-0.02)) and c.factor < before  # too few: down
    before = c.factor
    assert c.update(0.01) == pytest.approx(before)  # on target: unchanged
    before = c.factor
    assert c.update(0.9) == pytest.approx(before * math.exp(0.05))  # one step is at most max_step


def test_capacity_controller_respects_bounds():
    c = CapacityController(factor=1.9, min_factor=1.0, max_factor=2.0)
    for _ in range(50):
        c.update(1.0)
    assert c.factor == 2.0
    for _ in range(200):
        c.update(0.0)
    assert c.factor == 1.0
    with pytest.raises(ValueError):
        CapacityController(factor=0.5, min_factor=1.0)
    with pytest.raises(ValueError):
        CapacityController(factor=5.0, max_factor=4.0)
    with pytest.raises(ValueError):
        CapacityController(target_drop_rate=1.0)


def test_capacity_controller_state_round_trip():
    a = CapacityController(factor=1.3, target_drop_rate=0.02, gain=3.0)
    for rate in (0.1, 0.0, 0.05):
        a.update(rate)
    b = CapacityController()
    b.load_state_dict(a.state_dict())
    assert b == a and b.state_dict() == a.state_dict()
    assert [a.update(r) for r in (0.3, 0.0, 0.01)] == [b.update(r) for r in (0.3, 0.0, 0.01)]


def test_capacity_controller_applies_to_every_moe_layer():
    model = Transformer(tiny(num_hidden_layers=4))
    c = CapacityController(factor=1.75)
    c.apply(model)
    assert [moe.capacity_factor for _, moe in model.moe_layers()] == [1.75] * 3
    model.set_capacity_factor(None)
    assert all(moe.capacity_factor is None for _, moe in model.moe_layers())


# ---- the Transformer's aux loss ----------------------------------------------------------------------------

LOSS_CFG = dict(
    aux_loss_alpha=0.3,
    device_balance_alpha=0.2,
    comm_balance_alpha=0.1,
    router_z_loss_coef=0.05,
    ep_size=2,
    max_devices_per_token=1,
)


def test_transformer_aux_loss_is_the_weighted_sum_of_each_layers_losses():
    cfg = tiny(num_hidden_layers=4, **LOSS_CFG)
    model = build(cfg).train()
    inputs = {}
    hooks = [
        moe.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, a[0].detach()))
        for i, moe in model.moe_layers()
    ]
    ids = ids_for(cfg, 2, 10)
    out = model(ids)
    for h in hooks:
        h.remove()
    assert sorted(out.router_stats) == [1, 2, 3] == sorted(inputs)
    alphas = {
        "expert_balance": 0.3,
        "device_balance": 0.2,
        "comm_balance": 0.1,
        "router_z_loss": 0.05,
    }
    totals = dict.fromkeys(alphas, 0.0)
    for i, moe in model.moe_layers():
        routing = moe.gate(inputs[i].reshape(-1, cfg.hidden_size))
        want = balance_losses(routing, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 2, 1)
        for name, value in want.items():
            assert moe.last_losses[name].item() == pytest.approx(value.item(), rel=1e-5)
            totals[name] += value.item()
        assert int(out.router_stats[i].tokens_per_expert.sum()) == 2 * 10 * cfg.num_experts_per_tok
    for name in alphas:
        assert out.balance_losses[name].item() == pytest.approx(totals[name], rel=1e-5)
    want_aux = sum(alphas[n] * totals[n] for n in alphas)
    assert out.aux_loss.item() == pytest.approx(want_aux, rel=1e-5)
    assert out.aux_loss.item() > 0


def test_no_aux_loss_in_eval_or_without_grad():
    model = build(tiny(**LOSS_CFG))
    ids = ids_for(model.config, 1, 6)
    out = model.eval()(ids)
    assert out.aux_loss.item() == 0.0 and out.balance_losses == {}
    assert sorted(out.router_stats) == [1, 2]
    with torch.no_grad():
        out = model.train()(ids)
    assert out.aux_loss.item() == 0.0


def test_gradients_reach_the_router_through_the_balance_loss():
    model = build(tiny(**LOSS_CFG)).train()
    out = model(ids_for(model.config, 2, 8))
    out.aux_loss.backward()
    for _, moe in model.moe_layers():
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    # The balance loss reads router scores only: the last MoE layer's experts get no gradient from it
    # (earlier layers' experts do, through the hidden states later routers read).
    assert model.moe_layers()[-1][1].experts.gate_up_proj.grad is None
    # And through the combine weights from the language-model loss.
    model.zero_grad(set_to_none=True)
    ids = ids_for(model.config, 2, 8)
    logits = model(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for _, moe in model.moe_layers():
        assert moe.gate.weight.grad.abs().sum() > 0
        assert moe.experts.gate_up_proj.grad.abs().sum() > 0


def test_dropped_pairs_in_a_transformer_forward():
    cfg = tiny(capacity_factor=0.5)
    model = build(cfg).train()
    out = model(ids_for(cfg, 2, 16))
    n_pairs = 2 * 16 * cfg.num_experts_per_tok
    for stats in out.router_stats.values():
        cap = math.ceil(0.5 * n_pairs / cfg.n_routed_experts)
        assert stats.capacity == cap
        assert stats.dropped == int((stats.tokens_per_expert - cap).clamp_min(0).sum()) >= n_pairs // 2


@pytest.mark.parametrize("case", ["greedy", "learned_beta_and_scale", "capacity"])
def test_gradients_equal_the_per_token_loops(case):
    """The routed experts' backward (hand-written for the published SwiGLU) against autograd of the loop."""
    overrides = {"capacity": dict(capacity_factor=0.75)}.get(case, DROPLESS.get(case, {}))
    moe = make_moe(**overrides).train()
    if moe.experts.beta is not None:
        with torch.no_grad():
            moe.experts.beta.uniform_(0.5, 2.0)
            moe.experts.activation_scale.uniform_(0.5, 2.0)
    x = torch.randn(2, 9, H, generator=torch.Generator().manual_seed(5))
    probe = torch.randn(2, 9, H, generator=torch.Generator().manual_seed(6))

    def grads(run):
        moe.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_(True)
        (run(x_) * probe).sum().backward()
        return {"x": x_.grad, **{n: p.grad.clone() for n, p in moe.named_parameters()}}

    got = grads(moe)
    cap = moe.last_stats.capacity
    routing = moe.gate(x.reshape(-1, H))
    keep = None if cap is None else capacity_mask(routing.experts, routing.affinity, 8, cap)
    assert (case == "capacity") == (moe.last_stats.dropped > 0)
    want = grads(lambda x_: reference(moe, x_, keep))
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-5, name


def test_capacity_controller_refuses_bad_state():
    c = CapacityController(factor=1.5)
    with pytest.raises(ValueError, match="unknown capacity controller state"):
        c.load_state_dict({"factor": 1.2, "capacity": 3})
    with pytest.raises(ValueError):
        c.load_state_dict({"factor": 9.0})  # above max_factor
    assert c.factor == 1.5  # unchanged by a refused load
    c.load_state_dict({"factor": 2.0, "max_factor": 3.0})
    assert (c.factor, c.max_factor, c.min_factor) == (2.0, 3.0, 1.0)


def test_padding_is_not_routed_and_not_counted():
    moe = make_moe(capacity_factor=1.0).train()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 10, H, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False  # right padding
    mask[1, :4] = False  # left padding
    real = x[mask]  # (13, H)
    out = moe(x, mask)
    stats, losses = moe.last_stats, moe.last_losses
    want = moe(real)  # the real tokens alone: same routing, same capacity, same statistics
    assert (out[mask] - want).abs().max().item() <= 1e-5
    assert stats.pairs == 13 * 2 and int(stats.tokens_per_expert.sum()) == 26
    assert torch.equal(stats.tokens_per_expert, moe.last_stats.tokens_per_expert)
    assert stats.capacity == moe.last_stats.capacity == math.ceil(13 * 2 / 8)
    assert stats.dropped == moe.last_stats.dropped
    for name, value in moe.last_losses.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-6), name
    with torch.no_grad():  # a pad position gets the shared experts only
        shared_only = reference(moe, x, torch.zeros(20, 2, dtype=torch.bool))
    # within fp32 rounding of the reference's other GEMM shapes (a few ulps of values near 1; 1.4e-6 seen)
    assert (out[~mask] - shared_only[~mask]).abs().max().item() <= 1e-5


def test_padding_takes_no_capacity_from_real_tokens():
    moe, x = one_hot_router_moe(k=1, factor=1.0, n=8)  # every token wants expert 0
    moe.train()
    x[4:, 0] += 10.0  # the pads have the highest affinity of all
    mask = torch.tensor([True] * 4 + [False] * 4)
    out = moe(x, mask)
    cap = math.ceil(4 * 1 / 4)  # 1, from the 4 real tokens
    assert moe.last_stats.capacity == cap and moe.last_stats.dropped == 3
    best_real = int(x[:4, 0].argmax())
    keep = torch.tensor([[t == best_real] for t in range(8)])
    with torch.no_grad():
        assert (out - reference(moe, x, keep)).abs().max().item() <= 1e-5


def test_a_padded_transformer_batch_counts_real_tokens_only():
    cfg = tiny(capacity_factor=1.0, **LOSS_CFG)
    model = build(cfg).train()
    ids = ids_for(cfg, 2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 5:] = 0
    out = model(ids, attention_mask=mask)
    for stats in out.router_stats.values():
        assert stats.pairs == 17 * cfg.num_experts_per_tok == int(stats.tokens_per_expert.sum())
        assert stats.capacity == math.ceil(17 * cfg.num_experts_per_tok / cfg.n_routed_experts)
    assert torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0


def test_bf16_autocast_computes_the_experts_in_bf16_and_keeps_routing_and_gradients_fp32(monkeypatch):
    from moray.model import experts as experts_module

    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    out32 = model(ids)
    loss32 = out32.logits.float().log_softmax(-1).mean() + out32.aux_loss
    grads32 = torch.autograd.grad(loss32, list(model.parameters()))

    seen = []
    apply = experts_module.SwiGLUExperts.apply
    monkeypatch.setattr(
        experts_module.SwiGLUExperts, "apply", lambda *a: seen.append(a[1].dtype) or apply(*a)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(ids)
    loss16 = out16.logits.float().log_softmax(-1).mean() + out16.aux_loss
    grads16 = torch.autograd.grad(loss16, list(model.parameters()))

    assert seen and set(seen) == {torch.bfloat16}  # autocast does not reach into the Function itself
    assert all(v.dtype == torch.float32 for v in out16.balance_losses.values())
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    for g16, g32, p in zip(grads16, grads32, model.parameters()):
        assert g16.dtype == p.dtype == torch.float32  # master weights and their gradients stay fp32
        assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("skewed", [False, True])
def test_bf16_padded_pairs_give_fp32s_outputs_and_gradients(skewed):
    """bf16 on the CPU lays the pairs out once as an (E, C) grid padded to the largest group, so each
    grouped product is one bmm (grouped_mm's kernel loops over the experts, 2-3x slower at a few
    dozen rows each), unless padding would more than double the rows. Padding slots add nothing:
    the output and the gradients of x, the weights and the combine weights equal fp32's on the same
    bf16-rounded values (bf16 bounds)."""
    import copy

    from moray.model.experts import RoutedExperts, padded_for_bmm, sort_pairs

    g = torch.Generator().manual_seed(0)
    N, E, k = 24, 8, 2
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])  # (N, k)
    if skewed:
        experts[:, 0] = 0
    weights = torch.rand(N, k, generator=g)
    x = torch.randn(N, H, generator=g).bfloat16().float()
    probe = torch.randn(N, H, generator=g)
    m16 = RoutedExperts(E, H, I, learned_beta=False, activation_scale=False)
    with torch.no_grad():
        for p in m16.parameters():
            p.normal_(0.0, 0.3, generator=g)
    m16 = m16.bfloat16()
    m32 = copy.deepcopy(m16).float()

    pairs = sort_pairs(experts, weights, None, E)
    padded = padded_for_bmm(pairs, x.bfloat16())
    C = int(pairs.counts.max())
    assert (padded is pairs) == skewed
    if not skewed:
        assert len(padded.token_of_row) == C * E and (padded.counts == C).all()
        assert float(padded.weights.sum()) == pytest.approx(float(weights.sum()))  # padding weighs 0

    def run(module, dtype):
        x_, w_ = x.to(dtype).requires_grad_(True), weights.clone().requires_grad_(True)
        out = module(x_, experts, w_)
        (out.float() * probe).sum().backward()
        return {"out": out, "x": x_.grad, "w": w_.grad, **{n: p.grad for n, p in module.named_parameters()}}

    got, want = run(m16, torch.bfloat16), run(m32, torch.float32)
    for name in want:
        assert got[name].dtype == (torch.float32 if name == "w" else torch.bfloat16)
        err = (got[name].float() - want[name]).abs().max() / want[name].abs().max()
        assert err < 2e-2, name


def test_bf16_grouped_products_of_no_rows():
    """Every pair dropped (or a pipeline stage's shape probe): no rows, an empty product, and zero
    weight gradients."""
    from moray.model import experts as ex

    counts = torch.zeros(8, dtype=torch.long)
    a, b = torch.zeros(0, 32).bfloat16(), torch.randn(8, 32, 24).bfloat16()
    assert ex.grouped_matmul(a, b, counts).shape == (0, 24)
    assert ex.grouped_outer(a, torch.zeros(0, 24).bfloat16(), counts).abs().sum() == 0
