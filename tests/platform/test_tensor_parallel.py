"""Tensor parallelism against one process (gloo, fp32, 2 processes on the same tokens).

The tiny model with capacity binding, device-limited routing and every balance loss on, split
over two tp ranks (heads, MLP channels, vocabulary; the loss on vocab-sharded logits). The loss,
each balance loss, the drop count and every gradient equal the one-process values, with and
without MLA's query bottleneck (q_lora_rank); the replicated parameters' gradients are equal on
both ranks without any reduction. Models that cannot be split are refused, saying why."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moray.jobs.pretrain.step import lm_loss
from moray.model import Transformer, preset
from moray.platform.parallel import ParallelLayout
from moray.platform.tensor_parallel import UNSUPPORTED_EXTRAS, check_tensor_parallel
from tests.platform.step_check import assert_step_matches

BATCH, SEQ = 2, 16


def _config(q_lora_rank):
    return preset("tiny").replace(
        capacity_factor=0.5, topk_method="group_limited_greedy", n_group=2, topk_group=1, ep_size=2,
        max_devices_per_token=1, router_z_loss_coef=0.001, q_lora_rank=q_lora_rank,
    )  # fmt: skip


def _batch():
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, 512, (BATCH, SEQ + 1), generator=g)
    return seqs[:, :-1], seqs[:, 1:]


def _step(model, loss_parallel):
    torch.manual_seed(0)
    inputs, targets = _batch()
    with loss_parallel():
        out = model(inputs)
        loss = lm_loss(out.logits, targets) + out.aux_loss
        loss.backward()
    return {"loss": loss.detach(), "losses": {k: v.detach() for k, v in out.balance_losses.items()},
            "dropped": sum(st.dropped for st in out.router_stats.values())}  # fmt: skip


def _model(q_lora_rank):
    torch.manual_seed(0)
    return Transformer(_config(q_lora_rank)).train()


def _worker(rank: int, world: int, init_file: str, q_lora_rank, out_file: str) -> None:
    from moray.platform.tensor_parallel import apply_tensor_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layout = ParallelLayout(tp=world)
        model = _model(q_lora_rank)
        apply_tensor_parallel(model, layout.build_mesh()["tp"])
        result = _step(model, layout.loss_parallel)
        result["grads"] = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                           for n, p in model.named_parameters()}  # fmt: skip
        result["sharded"] = sorted(n for n, p in model.named_parameters() if hasattr(p, "full_tensor"))
        # replicated parameters: the same gradient on every rank, with no reduction of ours
        for name, p in model.named_parameters():
            if not hasattr(p, "full_tensor"):
                other = p.grad.clone()
                dist.broadcast(other, src=0)
                torch.testing.assert_close(p.grad, other, rtol=0, atol=0, msg=name)
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("q_lora_rank", [None, 16], ids=["q_proj", "q_lora"])
def test_tp2_equals_one_process(tmp_path, q_lora_rank):
    model = _model(q_lora_rank)
    want = _step(model, contextlib.nullcontext)
    want["grads"] = {n: p.grad for n, p in model.named_parameters()}
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), q_lora_rank, str(out)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    got = torch.load(out, weights_only=True)

    q = "q_proj" if q_lora_rank is None else "q_b_proj"
    assert {"embed_tokens.weight", "lm_head.weight", f"layers.0.self_attn.{q}.weight",
            "layers.1.self_attn.kv_b_proj.weight", "layers.1.self_attn.o_proj.weight",
            "layers.0.mlp.down_proj.weight", "layers.2.mlp.shared_experts.up_proj.weight"} <= set(got["sharded"])  # fmt: skip
    assert not any(
        "experts.gate_up_proj" in n or "kv_a_proj" in n or "gate.weight" in n for n in got["sharded"]
    )
    assert_step_matches(got, want)


def test_models_that_cannot_be_split_are_refused():
    tiny = preset("tiny")
    check_tensor_parallel(tiny, 4)  # 4 heads, 512 vocab, 160 channels, 32 shared-expert channels
    with pytest.raises(ValueError, match=r"parallel.tp=3: must divide the model's num_attention_heads \(4\)"):
        check_tensor_parallel(tiny, 3)
    with pytest.raises(ValueError, match=r"must divide the model's vocab_size \(510\)"):
        check_tensor_parallel(tiny.replace(vocab_size=510), 4)
    for extra in UNSUPPORTED_EXTRAS:
        value = [1] if extra == "relative_bias_offsets" else True
        with pytest.raises(
            ValueError, match=f"the model extra {extra} is not supported with tensor parallelism"
        ):
            ParallelLayout(dp=1, tp=2).configure_model(tiny.replace(**{extra: value}))
