"""The parallel layout: degrees, the borrowed expert-parallel ranks, device, backend, precision."""

import pytest
import torch

from moray.model import preset
from moray.platform.parallel import MESH_DIMS, ParallelLayout


def test_data_parallelism_takes_what_pp_and_tp_leave_and_ep_is_borrowed_from_it():
    layout = ParallelLayout.for_world(16, pp=2, tp=2, ep=2)
    assert (layout.dp, layout.pp, layout.tp, layout.ep) == (4, 2, 2, 2)
    assert layout.world_size == 16  # ep adds no ranks: it is carved out of dp
    assert dict(zip(MESH_DIMS, layout.mesh_shape)) == {"pp": 2, "dp_mod_ep": 2, "ep": 2, "tp": 2}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(world_size=6, pp=4), "not divisible by pp\\*tp=4"),
        (dict(world_size=4, ep=3), "ep must divide dp"),
        (dict(world_size=2, tp=0), "tp=0"),
        (dict(world_size=2, device_type="tpu"), "device_type='tpu'"),
    ],
)
def test_bad_degrees_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout.for_world(**kwargs)


def test_device_backend_and_precision_come_from_the_layout():
    cpu, gpu = ParallelLayout(dp=2), ParallelLayout(dp=2, device_type="cuda")
    assert (cpu.backend, cpu.compute_dtype) == ("gloo", torch.float32)
    assert (gpu.backend, gpu.compute_dtype) == ("nccl", torch.bfloat16)  # fp32 master weights, bf16 compute
    with cpu.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_precision_is_the_layouts_switch_and_auto_follows_the_hardware(monkeypatch):
    from moray.platform import parallel

    bf16 = ParallelLayout(precision="bf16")
    assert (
        bf16.compute_dtype == torch.bfloat16
        and ParallelLayout(precision="fp32").compute_dtype == torch.float32
    )
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(parallel, "cpu_bf16_isa", lambda: None)
    assert ParallelLayout(precision="auto").compute_dtype == torch.float32  # bf16 would be emulated
    assert ParallelLayout(precision="auto", device_type="cuda").precision == "bf16"
    monkeypatch.setattr(parallel, "cpu_bf16_isa", lambda: "amx_bf16")
    layout = ParallelLayout.for_world(2, precision="auto")
    assert (layout.precision, layout.compute_dtype) == ("bf16", torch.bfloat16)
    assert layout.describe()["cpu_bf16"] == "amx_bf16" and layout.describe()["compute_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="precision='fp16': use one of"):
        ParallelLayout(precision="fp16")


def test_the_model_config_takes_its_expert_parallel_degree_from_the_layout():
    cfg = preset("tiny", max_devices_per_token=1, ep_size=2)
    assert ParallelLayout(dp=4, ep=2).configure_model(cfg).ep_size == 2
    assert ParallelLayout(dp=4, ep=4).configure_model(preset("tiny")).ep_size == 4
    assert ParallelLayout(dp=1).configure_model(cfg) is cfg  # one process: the model's own emulation
    with pytest.raises(ValueError, match="parallel.ep=4 conflicts with the model's ep_size=2"):
        ParallelLayout(dp=4, ep=4).configure_model(cfg)


def test_a_single_process_without_a_process_group_has_no_mesh():
    assert ParallelLayout().build_mesh() is None
    with pytest.raises(RuntimeError, match="process group"):
        ParallelLayout(dp=2).build_mesh()


def test_auto_replicates_a_small_pure_data_parallel_cpu_model_and_shards_elsewhere():
    from moray.platform.parallel import REPLICATE_MAX_BYTES, resolve_dp_mode

    small, too_big = 10**6, REPLICATE_MAX_BYTES // 16 + 1
    assert resolve_dp_mode("auto", "cpu", tp=1, pp=1, ep=1, params=small) == "replicate"
    assert resolve_dp_mode("auto", "cpu", tp=1, pp=1, ep=1, params=too_big) == "shard"
    assert resolve_dp_mode("auto", "cuda", tp=1, pp=1, ep=1, params=small) == "shard"
    for split in (dict(tp=2, pp=1, ep=1), dict(tp=1, pp=2, ep=1), dict(tp=1, pp=1, ep=2)):
        assert resolve_dp_mode("auto", "cpu", params=small, **split) == "shard"
    assert resolve_dp_mode("replicate", "cuda", tp=1, pp=1, ep=1, params=too_big) == "replicate"  # as asked
    assert ParallelLayout.for_world(2, dp_mode="replicate").describe()["dp_mode"] == "replicate"
    with pytest.raises(ValueError, match="dp_mode='replicate' takes pure data parallelism"):
        ParallelLayout(dp=2, ep=2, dp_mode="replicate")
    with pytest.raises(ValueError, match="dp_mode='zero2': use one of"):
        resolve_dp_mode("zero2", "cpu", tp=1, pp=1, ep=1, params=small)
