"""`moray plan` against the DeepSeek-V2 paper, against what real parallelized models hold on this
machine, and its refusals.

The paper (arXiv 2405.04434, section 3.1.3 "Infrastructures", 3.2.3 "Training and Inference
Efficiency"): 16-way zero-bubble pipeline parallelism, 8-way expert parallelism, ZeRO-1 data
parallelism, no tensor parallelism, part of the operators recomputed; H800 nodes of 8 GPUs (NVLink
and NVSwitch inside, InfiniBand between); 4K sequences, a batch of 9216 sequences; 172.8K GPU hours
per trillion tokens, i.e. 1e12 / (172.8e3 * 3600) = 1607 tokens per GPU-second.

Measured here: parameters, gradients and AdamW state per rank of the tiny model under one process,
dp2 (FSDP2 = ZeRO-3), tp2 and dp2 x ep2 (2 gloo processes), and the bytes saved for backward
(torch's saved-tensor hooks, deduplicated by storage) against the planner's figures. Pipelines
the same way, every rank against the plan's figures for its pipeline rank: pp2 under 1F1B, GPipe
and interleaved 1F1B (2 processes, in the same spawn), pp2 x dp2, pp2 x tp2 and pp2 x ep2 (one
spawn of 4); their activations are the peak of the saved tensors alive at once over a step of
the schedule (each held from its pack until autograd releases it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moray.model import Transformer, preset
from moray.model.accounting import account, block_params, block_train_flops, head_train_flops
from moray.platform.parallel import ParallelLayout
from moray.platform.pipeline_parallel import stage_ranges
from moray.platform.plan import (
    GIB,
    balanced_split,
    get_device,
    layer_costs,
    main,
    make_layout,
    plan,
)

PAPER_TOKENS_PER_GPU_S = 1e12 / (172.8e3 * 3600)  # 1607


def _paper(gpus: int, **overrides):
    """DeepSeek-V2's published layout. The paper gives no GPU count; dp must be a multiple of ep=8
    that divides 9216 sequences. 4,096 GPUs (dp 256) is the largest power-of-two cluster whose
    pipeline still gets 36 >= 2 x 16 micro-batches per step; 2,048 (dp 128) is the cluster
    DeepSeek-V3's report names for the same kind of layout. "A portion of the operators are
    recomputed": modelled as full activation checkpointing; zero-bubble as ZB-H1."""
    c = preset("deepseek-v2")
    kw = dict(gpus=gpus, pp=16, ep=8, zero=1, seq_len=4096, global_batch=9216, micro_batch_size=1,
              activation_checkpointing="full", schedule="zb-h1") | overrides  # fmt: skip
    return c, make_layout(c, **kw)


@pytest.mark.parametrize("gpus", [4096, 2048])
def test_deepseek_v2_paper_layout_fits_and_matches_the_papers_throughput(gpus):
    c, layout = _paper(gpus)
    p = plan(c, layout, get_device("h800-80g"), name="deepseek-v2")
    assert layout.world == gpus and layout.dp == gpus // 16 and layout.tp == 1
    assert p.fits and p.peak.total < 80 * GIB
    ratio = p.tokens_per_device_s / PAPER_TOKENS_PER_GPU_S
    # 4,096: 1,604 tokens/s per GPU (1.00x the paper's 1,607); 2,048: 1,708 (1.06x)
    assert 0.5 < ratio < 2.0, ratio
    # tp 1: no tp traffic; ep 8 of one node over NVLink; dp over InfiniBand, overlapped
    comm = {x.dim: x for x in p.comm}
    assert set(comm) == {"ep", "pp", "dp"} and comm["ep"].link == "nvlink" and comm["dp"].link == "ib"


def test_deepseek_v2_paper_layout_needs_its_recomputation():
    c, layout = _paper(4096, activation_checkpointing="none")
    with pytest.raises(ValueError, match=r"does not fit: .* the largest part is activations") as e:
        plan(c, layout, get_device("h800-80g"))
    assert "over by" in str(e.value) and "activation checkpointing" in str(e.value)


def test_seed_layout_tp8_pp16_dp32_on_4096_gpus():
    c = preset("deepseek-v2")
    layout = make_layout(c, gpus=4096, tp=8, pp=16, ep=8, zero=1, global_batch=9216,
                         activation_checkpointing="full")  # fmt: skip
    assert (layout.tp, layout.pp, layout.dp) == (8, 16, 32)
    p = plan(c, layout, get_device("h100-80g"))
    assert p.fits
    # moray replicates the routed experts over tp: each tp rank runs every routed expert on the same
    # tokens and dispatches its own copy of them, so ep spans 64 ranks (InfiniBand) and carries 8x the
    # paper layout's tokens: several times slower per GPU.
    comm = {x.dim: x for x in p.comm}
    assert comm["ep"].link == "ib" and comm["tp"].link == "nvlink"
    c2, paper = _paper(4096)
    assert p.tokens_per_device_s < plan(c2, paper, get_device("h100-80g")).tokens_per_device_s / 4
    with pytest.raises(ValueError, match="the largest part is activations"):  # the same without recomputation
        plan(
            c, make_layout(c, gpus=4096, tp=8, pp=16, ep=8, zero=1, global_batch=9216), get_device("h100-80g")
        )


def test_pure_data_parallel_deepseek_v2_is_refused_naming_the_part():
    c = preset("deepseek-v2")
    with pytest.raises(ValueError, match=r"over by \d+\.\d GiB\); the largest part is optimizer state") as e:
        plan(c, make_layout(c, gpus=1024, zero=0, global_batch=1024), get_device("h100-80g"))
    assert "needs " in str(e.value) and "80 GiB" in str(e.value)


# ---- measured on this machine --------------------------------------------------------------------------
BATCH, SEQ = 4, 32  # global batch of the multi-process layouts (tiny)


class SavedBytes:
    """Bytes of the tensors autograd saves for backward, each storage once; parameters (their
    local shards, FSDP's gathered copies, DTensors' local tensors) are not activations."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def _storage(self, t):
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        while is_traceable_wrapper_subclass(t):  # DTensor, AsyncCollectiveTensor: the local data
            t = getattr(t, t.__tensor_flatten__()[0][0])
        return t.untyped_storage()

    def _pack(self, t):
        params = {self._storage(p).data_ptr() for p in self.model.parameters()}
        s = self._storage(t)
        if not isinstance(t, torch.nn.Parameter) and s.data_ptr() not in params:
            self.seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


class _Held:
    """A saved tensor as autograd holds it: dropped when autograd releases it (its node ran)."""

    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor, key, owner):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner._release(self.key)


class PeakSavedBytes(SavedBytes):
    """The most bytes saved for backward alive at once (each storage once): a schedule's peak,
    the micro-batches whose forward ran and whose backward has not yet released them."""

    def __init__(self, model):
        super().__init__(model)
        self.count: dict[int, int] = {}
        self.live = self.peak = 0

    def _pack(self, t):
        params = {self._storage(p).data_ptr() for p in self.model.parameters()}
        s = self._storage(t)
        key = s.data_ptr()
        if isinstance(t, torch.nn.Parameter) or t.device.type == "meta" or key in params:
            return t
        if not self.count.get(key):
            self.seen[key] = s.nbytes()
            self.live += self.seen[key]
            self.peak = max(self.peak, self.live)
        self.count[key] = self.count.get(key, 0) + 1
        return _Held(t, key, self)

    def _release(self, key):
        self.count[key] -= 1
        if not self.count[key]:
            self.live -= self.seen.pop(key)

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda h: h.tensor if isinstance(h, _Held) else h
        )
        self.hooks.__enter__()
        return self


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def _measure(model, opt, inputs, targets, loss_parallel) -> dict:
    """One training step; the bytes of parameters, gradients, optimizer state and saved activations."""
    from moray.jobs.pretrain.step import lm_loss

    with loss_parallel():
        with SavedBytes(model) as saved:
            out = model(inputs)
            loss = lm_loss(out.logits, targets) + out.aux_loss
        loss.backward()
    grads = _local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    opt.step()
    state = _local_bytes(
        t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()
    )
    return {"params": _local_bytes(model.parameters()), "grads": grads, "optimizer": state,
            "activations": saved.total}  # fmt: skip


def _measure_pipelined(model, opt, micro_batches, loss_parallel) -> dict:
    """The second step of a pipelined model (a schedule's first step also runs a forward and a
    backward of its own, on empty tensors, to learn its stages' shapes): the bytes of this rank's
    parameters, gradients, optimizer state and its peak of saved activations over the schedule."""
    null = contextlib.nullcontext
    model.forward_backward(micro_batches, 1.0, null, loss_parallel)
    opt.zero_grad(set_to_none=True)
    with PeakSavedBytes(model) as saved:
        model.forward_backward(micro_batches, 1.0, null, loss_parallel)
    assert saved.live == 0 and not any(saved.count.values())  # every saved tensor was released
    grads = _local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    opt.step()
    state = _local_bytes(
        t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()
    )
    return {"params": _local_bytes(model.parameters()), "grads": grads, "optimizer": state,
            "activations": saved.peak}  # fmt: skip


def _batch(vocab: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, vocab, (batch, seq + 1), generator=g)
    return seqs[:, :-1], seqs[:, 1:]


LAYOUTS = {"dp2": dict(dp=2), "tp2": dict(tp=2), "dp2xep2": dict(dp=2, ep=2)}


# Pipelines: PIPE_MICRO micro-batches a step of PIPE_BATCH / PIPE_MICRO sequences (over the dp ranks)
PIPE_BATCH, PIPE_MICRO = 8, 4


@dataclass(frozen=True)
class Pipe:
    degrees: dict
    schedule: str = "1f1b"
    virtual_stages: int = 1
    layers: int = 3  # the tiny model's; interleaving 2 chunks on each of 2 ranks takes 4

    @property
    def world(self) -> int:
        return ParallelLayout(**self.degrees).world_size


PIPELINES = {
    "pp2": Pipe(dict(pp=2)),
    "pp2-gpipe": Pipe(dict(pp=2), "gpipe"),
    "pp2-interleaved": Pipe(dict(pp=2), "interleaved_1f1b", 2, 4),
    "pp2xdp2": Pipe(dict(pp=2, dp=2)),
    "pp2xtp2": Pipe(dict(pp=2, tp=2)),
    "pp2xep2": Pipe(dict(pp=2, dp=2, ep=2)),
    "pp2xtp2xep2": Pipe(dict(pp=2, dp=2, tp=2, ep=2)),  # 8 ranks
}


def _measure_layout(name: str) -> dict:
    """This rank's figures for one layout (every rank of the process group builds it)."""
    from moray.jobs.pretrain.optim import build_optimizer
    from moray.jobs.pretrain.parallel import parallelize
    from moray.platform.pipeline_parallel import PipelineOptions, pipeline_group

    pipe = PIPELINES.get(name, Pipe(LAYOUTS.get(name), None))
    layout = ParallelLayout(**pipe.degrees)
    mesh = layout.build_mesh()
    torch.manual_seed(0)
    config = layout.configure_model(preset("tiny", num_hidden_layers=pipe.layers))
    dp_rank = mesh["dp"].get_local_rank()
    if pipe.schedule is None:
        model = parallelize(Transformer(config).train(), layout, mesh)
        opt = build_optimizer(model, "adamw", 1e-3, 0.1)
        inputs, targets = _batch(512, BATCH, SEQ)
        rows = slice(dp_rank * BATCH // layout.dp, None)
        inputs, targets = inputs[rows][: BATCH // layout.dp], targets[rows][: BATCH // layout.dp]
        return _measure(model, opt, inputs, targets, layout.loss_parallel)
    options = PipelineOptions(pipe.schedule, pipe.virtual_stages, PIPE_MICRO, SEQ)
    model = parallelize(Transformer(config).train(), layout, mesh, options)
    opt = build_optimizer(model, "adamw", 1e-3, 0.1, pipeline_group=pipeline_group(model))
    inputs, targets = _batch(512, PIPE_BATCH, SEQ)
    size = PIPE_BATCH // PIPE_MICRO  # a global micro-batch; each dp rank takes its slice
    per_rank = size // layout.dp
    first = [m * size + dp_rank * per_rank for m in range(PIPE_MICRO)]
    micro = [(inputs[i : i + per_rank], targets[i : i + per_rank]) for i in first]
    figures = _measure_pipelined(model, opt, micro, layout.loss_parallel)
    return {**figures, "pp_rank": mesh["pp"].get_local_rank(), "layers": sorted(int(k) for k in model.layers)}


def _worker(rank: int, world: int, names: list[str], init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({name: _measure_layout(name) for name in names}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(tmp, world: int, names: list[str]) -> list[dict]:
    """Each named layout's figures on every rank of one spawn of `world` gloo processes."""
    out = tmp / f"figures-{world}.pt"
    mp.start_processes(_worker, args=(world, names, str(tmp / f"init-{world}"), str(out)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(world)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The 2-rank layouts' figures, on both ranks: one spawn of 2 gloo processes for all of them."""
    names = list(LAYOUTS) + [n for n, pipe in PIPELINES.items() if pipe.world == 2]
    return _spawn(tmp_path_factory.mktemp("plan"), 2, names)


@pytest.fixture(scope="module")
def measured4(tmp_path_factory):
    """The 4-rank pipelines' figures, on every rank: one spawn of 4 gloo processes."""
    names = [n for n, pipe in PIPELINES.items() if pipe.world == 4]
    return _spawn(tmp_path_factory.mktemp("plan4"), 4, names)


@pytest.fixture(scope="module")
def measured8(tmp_path_factory):
    """pp2 x dp2 x tp2 x ep2's figures, on every rank: one spawn of 8 gloo processes."""
    return _spawn(tmp_path_factory.mktemp("plan8"), 8, ["pp2xtp2xep2"])


def _planned(name: str, batch: int, seq: int, **degrees) -> dict:
    c = preset(name)
    layout = make_layout(c, **degrees, zero=3, global_batch=batch, micro_batches=1, seq_len=seq,
                         param_dtype="fp32", compute_dtype="fp32", attention="fused")  # fmt: skip
    s = plan(c, layout, get_device("cpu-this-machine")).peak
    return {"params": s.params, "grads": s.grads, "optimizer": s.optimizer, "activations": s.activations}


@pytest.mark.parametrize("name,batch,seq", [("tiny", 2, 16), ("small", 2, 64)])
def test_one_process_memory_matches_the_model(name, batch, seq):
    torch.manual_seed(0)
    from moray.jobs.pretrain.optim import build_optimizer

    model = Transformer(preset(name)).train()
    got = _measure(model, build_optimizer(model, "adamw", 1e-3, 0.1), *_batch(preset(name).vocab_size, batch, seq),
                   __import__("contextlib").nullcontext)  # fmt: skip
    want = _planned(name, batch, seq)
    for part in want:
        # parameters, gradients and moments exactly; activations within 0.1% (tiny 539,648 planned
        # vs 540,076 measured bytes, small 40,084,480 vs 40,089,144, with moray's RMSNorm kernel:
        # per-layer index tensors of E entries and the scalar losses are not modelled)
        assert got[part] == pytest.approx(want[part], rel=0.01), part


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_memory_matches_real_ranks(measured, layout):
    """Parameters, gradients and AdamW state of each rank exactly (tp2's included the embedding's
    gradient, which moray's vocab-parallel embedding gets back whole on each tp rank); the
    activations of the mean rank within 0.1% (the planner assumes balanced routing: under ep one
    rank's experts receive more rows than the other's, rank 0 saves 1.1% more here, but the pairs
    add up over the ranks)."""
    want = _planned("tiny", BATCH, SEQ, **LAYOUTS[layout])
    for rank in measured:
        for part in ("params", "grads", "optimizer"):
            assert rank[layout][part] == pytest.approx(want[part], rel=0.01), (layout, part)
    mean = sum(rank[layout]["activations"] for rank in measured) / len(measured)
    assert mean == pytest.approx(want["activations"], rel=0.01), layout


def _planned_pipeline(name: str):
    """The plan of a measured pipeline (the tiny model, fp32 FSDP2, CPU attention)."""
    pipe = PIPELINES[name]
    c = preset("tiny", num_hidden_layers=pipe.layers)
    schedule = "1f1b" if pipe.schedule == "interleaved_1f1b" else pipe.schedule  # the plan's: v > 1
    layout = make_layout(c, **pipe.degrees, zero=3, global_batch=PIPE_BATCH, micro_batches=PIPE_MICRO,
                         seq_len=SEQ, schedule=schedule, virtual_stages=pipe.virtual_stages,
                         param_dtype="fp32", compute_dtype="fp32", attention="fused")  # fmt: skip
    return c, plan(c, layout, get_device("cpu-this-machine"))


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_memory_matches_real_ranks(request, name):
    """Every rank against the plan's figures for its pipeline rank: its layers (the planner's split
    is the runtime's), its parameters, gradients and AdamW state exactly, and the peak of its saved
    activations over the schedule's second step within 3% (the issue asks 10%). Measured / planned
    peaks, first and last pipeline rank: pp2 1.0009, 1.0035; GPipe 1.0002, 1.0003; interleaved
    1.0001, 1.0018; pp2 x dp2 1.0011, 1.0038; pp2 x tp2 1.0013, 1.0048; pp2 x ep2 1.0126 and 0.9948
    on the first rank's two ep ranks, 1.0184 on the last's (routing is not balanced, as the plan
    assumes: one rank's experts receive more rows). What stays out: per-layer index tensors of E
    entries, scalar losses, the stage outputs a schedule keeps for its backward and receive
    buffers (not saved tensors: a*H per token and micro-batch in flight). pp2 x tp2 x ep2 (8 ranks)
    is checked the same way, within the same 3%."""
    pipe = PIPELINES[name]
    ranks = request.getfixturevalue({2: "measured", 4: "measured4", 8: "measured8"}[pipe.world])
    c, p = _planned_pipeline(name)
    n = c.num_hidden_layers
    # the runtime's stage split is the planner's: stage_ranges is balanced_split over layer_costs
    ranges = stage_ranges(c, 2 * pipe.virtual_stages, SEQ)
    bounds = balanced_split(layer_costs(c, SEQ), 2 * pipe.virtual_stages)
    assert [list(r) for r in ranges] == [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    assert sorted(i for s in p.stages for i in s.layers) == list(range(n))
    # the schedule's micro-batches in flight, in whole-rank units (interleaved: chunk passes / v)
    flight = {"1f1b": [2, 1], "gpipe": [PIPE_MICRO] * 2, "interleaved_1f1b": [2.5, 1.5]}[pipe.schedule]
    assert [s.in_flight for s in p.stages] == flight
    for got in ranks:
        got = got[name]
        want = p.stages[got["pp_rank"]]
        assert got["layers"] == want.layers, (name, got["pp_rank"])
        assert (got["params"], got["grads"], got["optimizer"]) == (want.params, want.grads, want.optimizer), (
            name
        )
        assert got["activations"] == pytest.approx(want.activations, rel=0.03), (name, got["pp_rank"])


# ---- pipeline split --------------------------------------------------------------------------------------
def test_balanced_split_is_optimal_and_contiguous():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.choice([0.5, 1, 2, 3, 7]) for _ in range(n)]
        stages = rng.randint(1, n)
        bounds = balanced_split(costs, stages)
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == stages + 1
        assert all(a < b for a, b in zip(bounds, bounds[1:]))  # non-empty, contiguous
        got = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = min(
            max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
            for cuts in itertools.combinations(range(1, n), stages - 1)
        )
        assert got == pytest.approx(best)
    assert balanced_split([1] * 10, 3) == [0, 2, 6, 10]  # spare capacity on the first stage
    with pytest.raises(ValueError, match="cannot split 3 layers into 4"):
        balanced_split([1, 1, 1], 4)


def test_layer_costs_are_the_models_training_flops():
    c = preset("deepseek-v2")
    costs = layer_costs(c, 4096)
    assert len(costs) == 60 and costs[-1] > costs[-2]  # the head rides on the last layer
    assert sum(costs) == pytest.approx(account(c, 4096).train_flops_per_token, rel=1e-9)
    total = (
        sum(block_params(c, i).total for i in range(60)) + 2 * c.vocab_size * c.hidden_size + c.hidden_size
    )
    assert total == account(c).total_params
    assert head_train_flops(c) == 6 * c.vocab_size * c.hidden_size
    assert block_train_flops(c, 1, 4096).replicated > block_train_flops(c, 0, 4096).replicated  # experts


# ---- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(tp=3), r"--tp 3 must divide the model's num_attention_heads \(4\)"),
        (dict(tp=8), r"--tp 8 must divide the model's num_attention_heads"),
        (dict(pp=2, virtual_stages=2), r"num_hidden_layers \(3\) < pp\*virtual_stages = 4"),
        (dict(dp=4, ep=3), r"--ep 3 must divide dp = 4"),
        (dict(dp=6, ep=3), r"--ep 3 must divide the model's n_routed_experts \(8\)"),
        (dict(dp=4, global_batch=6), r"--global-batch 6 is not divisible by dp x micro-batch size = 4 x 1"),
        (dict(dp=2, global_batch=8, micro_batches=3), r"not divisible by dp x micro-batches = 2 x 3"),
        (dict(gpus=6, pp=1, tp=4), r"--gpus 6 is not divisible by pp\*tp = 4"),
        (dict(gpus=8, dp=3), r"--dp 3 disagrees with --gpus 8"),
        (dict(zero=4), r"--zero 4: use one of"),
        (dict(schedule="zb-v"), r"--schedule zb-v: use one of"),
    ],
)
def test_limits_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        make_layout(preset("tiny"), **kw)


def test_vocab_and_extras_refused_by_name():
    with pytest.raises(ValueError, match=r"--tp 4 must divide the model's vocab_size \(510\)"):
        make_layout(preset("tiny", vocab_size=510), tp=4)
    with pytest.raises(ValueError, match="tie_word_embeddings is not supported with tensor parallelism"):
        make_layout(preset("tiny", tie_word_embeddings=True), tp=2)


# ---- command line ---------------------------------------------------------------------------------------
def test_cli(capsys):
    from moray.platform.cli import COMMANDS

    assert COMMANDS["plan"][0] == "moray.platform.plan"
    argv = ["deepseek-v2", "--gpus", "4096", "--pp", "16", "--ep", "8", "--global-batch", "9216",
            "--activation-checkpointing", "full", "--schedule", "zb-h1", "--device", "h800-80g"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "tokens/s per device" in text and "fits" in text and "ep 8 borrowed from dp" in text
    assert main([*argv, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["layout"]["world"] == 4096 and {c["dim"] for c in d["comm"]} == {"ep", "pp", "dp"}
    assert main(["deepseek-v2", "--gpus", "64"]) == 2
    assert "moray plan: error: does not fit" in capsys.readouterr().err
    assert main(["tiny", "--tp", "3"]) == 2
    assert "--tp 3 must divide" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tiny", "--glob", "8"])  # no abbreviations


def test_readme_example_is_the_planners_output(capsys):
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("  $ moray plan deepseek-v2 --gpus 4096")
    lines = readme[start:].split("\n")
    end = lines.index("  ```")
    command = " ".join(line.strip().rstrip("\\") for line in lines[:2]).split()[3:]
    shown = "\n".join(line[4:] for line in lines[2:end])
    assert main(command) == 0
    assert capsys.readouterr().out.rstrip("\n") == shown
