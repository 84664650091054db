"""Expert parallelism and global routing decisions against one process (gloo, fp32, 2 processes).

The same tiny model and global batch: one process sees the whole batch; two data-parallel ranks see
half each, deciding capacity and the balance losses over both halves (GlobalTokens), with the
routed experts either replicated (dp2) or split over the two ranks (ep2, all-to-all dispatch).
Tokens are dropped (a capacity factor of 0.5), routing is device-limited (2 groups, 1 per token)
and every balance loss is on. The loss, each balance loss, the drop count and every gradient
(averaged over ranks as FSDP reduces them) equal the one-process values."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moray.jobs.pretrain.step import lm_loss
from moray.model import Transformer, preset
from tests.platform.step_check import assert_step_matches

BATCH, SEQ = 4, 16


def _config(extras: bool = False):
    return preset("tiny").replace(
        capacity_factor=0.5, topk_method="group_limited_greedy", n_group=2, topk_group=1, ep_size=2,
        max_devices_per_token=1, router_z_loss_coef=0.001, swiglu_learned_beta=extras,
        expert_activation_scale=extras,
    )  # fmt: skip


def _batch():
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, 512, (BATCH, SEQ + 1), generator=g)
    return seqs[:, :-1], seqs[:, 1:]


def _model(extras: bool = False):
    torch.manual_seed(0)
    return Transformer(_config(extras)).train()


def _step(model, inputs, targets):
    out = model(inputs)
    loss = lm_loss(out.logits, targets) + out.aux_loss
    loss.backward()
    dropped = sum(st.dropped for st in out.router_stats.values())
    losses = {k: v.detach() for k, v in out.balance_losses.items()}
    return loss.detach(), losses, dropped


def _worker(rank: int, world: int, init_file: str, ep: int, extras: bool, out_file: str) -> None:
    from moray.platform.expert_parallel import (
        ALL_TO_ALL,
        ExpertShard,
        apply_expert_parallel,
        install_global_tokens,
    )
    from moray.platform.parallel import ParallelLayout

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = ParallelLayout(dp=world, ep=ep).build_mesh()
        model = _model(extras)
        install_global_tokens(model, mesh["dp"].get_group())
        if ep > 1:
            apply_expert_parallel(model, mesh["ep"])
        # the pairs this rank sends to an expert on the other rank: what the all-to-all must carry
        remote = []

        def count_remote(shard, args):
            _, experts, _, keep = args
            remote.append(int((keep & (experts // shard.n_local != mesh["ep"].get_local_rank())).sum()))

        for m in model.modules():
            if isinstance(m, ExpertShard):
                m.register_forward_pre_hook(count_remote)
        ALL_TO_ALL.reset()
        inputs, targets = _batch()
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss, losses, dropped = _step(model, inputs[rows], targets[rows])
        if ep > 1:
            # forward: my pairs out, the other rank's results back; backward: the same, reversed. So
            # over both ranks, each remote pair's row crosses 4 times.
            sent = torch.tensor([ALL_TO_ALL.bytes_sent, sum(remote)], dtype=torch.float64)
            dist.all_reduce(sent)
            assert sum(remote) > 0 and sent[0] == 4 * sent[1] * model.config.hidden_size * 4

        # what FSDP's reduction would leave: the mean over data-parallel ranks; an expert shard's
        # gradient is already summed over the ranks that sent it tokens
        grads = {}
        experts = {id(p) for m in model.modules() if isinstance(m, ExpertShard) for p in m.parameters()}
        for name, p in model.named_parameters():
            if id(p) in experts:
                grads[name] = p.grad.full_tensor() / world
            else:
                dist.all_reduce(p.grad)
                grads[name] = p.grad / world
        for t in [loss, *losses.values()]:
            dist.all_reduce(t)
        d = torch.tensor(float(dropped))
        dist.all_reduce(d)
        if rank == 0:
            torch.save({"loss": loss / world, "losses": {k: v / world for k, v in losses.items()},
                        "dropped": float(d), "grads": grads}, out_file)  # fmt: skip
    finally:
        dist.destroy_process_group()


def reference(extras: bool) -> dict:
    model = _model(extras)
    loss, losses, dropped = _step(model, *_batch())
    return {"loss": loss, "losses": losses, "dropped": float(dropped),
            "grads": {n: p.grad for n, p in model.named_parameters()}}  # fmt: skip


# ep2-extras: the learned Swish beta and per-expert activation scale take autograd's own path
@pytest.mark.parametrize("ep,extras", [(1, False), (2, False), (2, True)], ids=["dp2", "ep2", "ep2-extras"])
def test_two_ranks_equal_one_process(tmp_path, ep, extras):
    want = reference(extras)
    out = tmp_path / "rank0.pt"
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), ep, extras, str(out)), nprocs=2, start_method="spawn"
    )
    got = torch.load(out, weights_only=True)
    assert_step_matches(got, want)
