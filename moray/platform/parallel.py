"""The parallel layout: one object that training and serving both read (torchtitan's ParallelDims).

It validates the degrees, names the device-mesh dimensions, and picks the device type, the
collective backend and the compute precision.

    world_size = pp * dp * tp        ep is borrowed from dp: ep divides dp
    mesh dims  = ("pp", "dp_mod_ep", "ep", "tp"), and "dp" = ("dp_mod_ep", "ep") flattened

Expert-parallel ranks are data-parallel ranks (each sees its own slice of the batch), as in
torchtitan: the routed experts are split over the `ep` ranks and sharded (FSDP) over what is
left, `dp_mod_ep`; everything else is sharded over the whole `dp`.

Plans are applied from outside the model in a fixed order (see moray/jobs/pretrain/parallel.py):
tensor parallel, expert parallel, pipeline split, activation checkpointing, FSDP.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

MESH_DIMS = ("pp", "dp_mod_ep", "ep", "tp")
DEVICE_TYPES = ("cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
DP_MODES = ("auto", "shard", "replicate")
# auto replicates a CPU model whose replica's training state (fp32 weights, gradients and two AdamW
# moments: 16 bytes a parameter) stays under this; a rule of the config alone, so that every rank
# resolves it alike
REPLICATE_MAX_BYTES = 8 << 30


def cpu_bf16_isa() -> str | None:
    """The CPU's bf16 matrix instructions oneDNN uses: "amx_bf16", "avx512_bf16", or None (bf16
    would then be emulated, slower than fp32)."""
    if torch.cpu._is_amx_tile_supported():
        return "amx_bf16"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return None


def resolve_precision(precision: str, device_type: str) -> str:
    """ "auto" is bf16 where the hardware computes it natively (GPUs; CPUs with AMX or AVX-512
    BF16), else fp32; "fp32" and "bf16" are taken as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" or cpu_bf16_isa() else "fp32"


def resolve_dp_mode(mode: str, device_type: str, tp: int, pp: int, ep: int, params: int) -> str:
    """How data-parallel ranks hold the model. "shard": FSDP2 (parameters, gradients and optimizer
    state split over the ranks; each block's parameters gathered for its forward and again for its
    backward, gradients reduce-scattered). "replicate": every rank holds the whole model and its
    optimizer (DDP), gradients all-reduced once per step, overlapping the backward.

    "auto" replicates on the CPU, for a model whose replica fits (REPLICATE_MAX_BYTES), in a pure
    data-parallel layout: gloo all-reduces a tensor twice as fast as it all-gathers and then
    reduce-scatters it (336 MB: 354 ms against 681 + 873, two processes on this machine), and
    sharding moves the parameters twice per micro-batch besides. Elsewhere it shards, as before."""
    if mode not in DP_MODES:
        raise ValueError(f"dp_mode={mode!r}: use one of {DP_MODES}")
    if mode != "auto":
        return mode
    pure_dp = tp == 1 and pp == 1 and ep == 1
    small = 16 * params <= REPLICATE_MAX_BYTES
    return "replicate" if device_type == "cpu" and pure_dp and small else "shard"


@dataclass(frozen=True)
class LayoutMesh:
    """The root mesh and its flattened dimensions: mesh["tp"], mesh["dp"] ...

    An elastic run may start more workers than its layout takes: the layout holds the first
    `world_size` ranks and the others are spare (they hold no coordinate and take no part in
    training); `active_group` is then the layout's ranks (None: every rank of the process group)."""

    root: object  # DeviceMesh
    flattened: dict
    active_group: object = None
    spare: bool = False

    def __getitem__(self, name: str):
        return self.flattened[name] if name in self.flattened else self.root[name]


@dataclass(frozen=True)
class ParallelLayout:
    dp: int = 1  # data-parallel ranks (the ep ranks among them)
    pp: int = 1  # pipeline stages
    tp: int = 1  # tensor-parallel ranks
    ep: int = 1  # expert-parallel ranks, borrowed from dp
    device_type: str = "cpu"
    precision: str | None = None  # fp32 | bf16 | auto; None: the device's default (bf16 on GPUs)
    dp_mode: str = "shard"  # shard | replicate (resolve_dp_mode decides "auto" from the model)

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel.{name}={v!r}: must be a positive integer")
        if self.dp % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep}: expert-parallel ranks are borrowed from the {self.dp} "
                "data-parallel ranks, so ep must divide dp"
            )
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f"device_type={self.device_type!r}: use one of {DEVICE_TYPES}")
        if self.precision is not None:
            object.__setattr__(self, "precision", resolve_precision(self.precision, self.device_type))
        if self.dp_mode not in DP_MODES[1:]:
            raise ValueError(
                f"dp_mode={self.dp_mode!r}: use one of {DP_MODES[1:]} (resolve_dp_mode decides auto)"
            )
        if self.dp_mode == "replicate" and (self.tp > 1 or self.pp > 1 or self.ep > 1):
            raise ValueError(
                "dp_mode='replicate' takes pure data parallelism (tp, pp and ep 1); "
                "layouts that split the model shard it (dp_mode='shard')"
            )

    @classmethod
    def for_world(cls, world_size: int, pp: int = 1, tp: int = 1, ep: int = 1, device_type: str = "cpu",
                  precision: str | None = None, dp_mode: str = "shard"):  # fmt: skip
        """The layout that fills `world_size` ranks: data parallelism takes what pp and tp leave."""
        if pp < 1 or tp < 1:
            return cls(pp=pp, tp=tp)  # refused by the checks, naming the degree
        if world_size % (pp * tp):
            raise ValueError(f"world size {world_size} is not divisible by pp*tp={pp * tp}")
        return cls(dp=world_size // (pp * tp), pp=pp, tp=tp, ep=ep, device_type=device_type,
                   precision=precision, dp_mode=dp_mode)  # fmt: skip

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.pp, self.dp // self.ep, self.ep, self.tp)

    # ---- precision ------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """What matmuls compute in. bf16 is mixed precision: the parameters (master weights), the
        gradients' reduction, the optimizer state, the router and the loss stay fp32. Without a
        precision, bf16 on GPUs and fp32 on the CPU."""
        precision = self.precision or ("bf16" if self.device_type == "cuda" else "fp32")
        return torch.bfloat16 if precision == "bf16" else torch.float32

    @property
    def working_weights(self) -> bool:
        """bf16 compute over whole, plain parameters: one process's, or the CPU's replicas (dp_mode
        "replicate"). The matmul weights are cast once a step into kept bf16 copies, and the replicas'
        gradients are averaged by them too, not by DDP (moray.jobs.pretrain.working_weights)."""
        if self.compute_dtype == torch.float32:
            return False
        return self.world_size == 1 or (self.dp_mode == "replicate" and self.device_type == "cpu")

    def autocast(self):
        """The compute-precision context for forward passes; parameters stay fp32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def loss_parallel(self):
        """The context for computing the loss and its backward: with tp > 1 the logits stay sharded
        on the vocabulary and the cross-entropy is computed on the shards (DTensor's loss_parallel)."""
        if self.tp == 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    # ---- mesh and model -------------------------------------------------------------------------
    def build_mesh(self) -> LayoutMesh | None:
        """The named device mesh (collective: every rank calls it), with "dp" flattened from
        ("dp_mod_ep", "ep"). None for a single process with no process group."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            if self.world_size != 1:
                raise RuntimeError(f"a {self.world_size}-rank layout needs an initialized process group")
            return None
        world = dist.get_world_size()
        if world < self.world_size:
            raise RuntimeError(f"layout has {self.world_size} ranks, the process group {world}")
        if world == self.world_size:
            mesh = init_device_mesh(self.device_type, self.mesh_shape, mesh_dim_names=MESH_DIMS)
            active = None
        else:  # every rank takes part in creating the groups, the spare ones too
            from torch.distributed.device_mesh import DeviceMesh

            active = dist.new_group(list(range(self.world_size)))
            ranks = torch.arange(self.world_size).view(self.mesh_shape)
            mesh = DeviceMesh(self.device_type, ranks, mesh_dim_names=MESH_DIMS)
            if dist.get_rank() >= self.world_size:
                return LayoutMesh(mesh, {}, active, spare=True)
        # torch asks callers to keep flattened meshes themselves rather than slice them from the root
        return LayoutMesh(mesh, {"dp": mesh["dp_mod_ep", "ep"]._flatten("dp")}, active)

    def configure_model(self, config):
        """The model config this layout trains or serves: its expert-parallel degree drives the
        device-limited routing and the device/communication balance losses. With ep=1 the model
        keeps its own `ep_size` (the single-process emulation of its published layout). Raises
        ValueError if the model cannot be split over the tp ranks."""
        from moray.platform.tensor_parallel import check_tensor_parallel

        check_tensor_parallel(config, self.tp)
        if self.ep == 1:
            return config
        if config.ep_size not in (1, self.ep):
            raise ValueError(
                f"parallel.ep={self.ep} conflicts with the model's ep_size={config.ep_size}; "
                "set the expert-parallel degree in one place (parallel.ep)"
            )
        m = config.max_devices_per_token
        return config.replace(ep_size=self.ep, max_devices_per_token=None if m is None else min(m, self.ep))

    def describe(self) -> dict:
        return {"dp": self.dp, "pp": self.pp, "tp": self.tp, "ep": self.ep, "device": self.device_type,
                "backend": self.backend, "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "cpu_bf16": cpu_bf16_isa() or "none", "dp_mode": self.dp_mode}  # fmt: skip
