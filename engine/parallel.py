"""Parallel layouts on PyTorch's distributed engine: DeviceMesh, DTensor TP/SP, FSDP2, pipelining.

Launched by ``torchrun`` (``python -m kiln.engine.train`` or ``kiln train``); one process is the
plain single-device path. Every rank builds the full model from the seed (so every layout
starts from the weights a single process would), then:

1. pipeline: keeps its stages' blocks (split by FLOPs, parameter names unchanged);
2. tensor parallel: per block, heads / MLP hidden / modulation outputs column-parallel, the
   output projections row-parallel, activations sequence-parallel between them
   (model/sequence_parallel.py); the QK-norm attention op runs on the local heads;
3. context parallel: each rank of a ``cp`` group keeps 1/cp of every sample's tokens; attention
   trades them for 1/cp of the heads with an all-to-all (Ulysses; model/sequence_parallel.py)
   or passes keys and values around the group (``cp_attention=ring``; model/ring_attention.py);
4. activation checkpointing, then ``torch.compile`` per block, then
5. FSDP2 per block and per stage root (HSDP over ``dp_replicate`` x ``dp_shard``·``cp``), parameters
   gathered in the autocast dtype (bf16 / fp16) over fp32 master shards, gradients reduced in fp32.

That order (TP -> AC -> compile -> FSDP) is the one that composes (torchtitan). Data: the
global batch is the single-process batch; data-parallel rank r takes samples r, r+dp, ...
(the ranks of a cp group take the same samples).
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch._dynamo  # noqa: F401  before any process group exists: see release_process_groups
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from kiln.engine.config import RunConfig
from kiln.engine.errors import ConfigError
from kiln.model.mmdit import MMDiT
from kiln.model.sequence_parallel import Regather

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class Dist:
    """Where this process sits in the layout. A single process has world 1 and no mesh."""

    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MESH_DIMS, 1))
    rank: int = 0
    world: int = 1
    mesh: DeviceMesh | None = None
    coords: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MESH_DIMS, 0))  # read once at init
    # with cp > 1: the same ranks as ``mesh`` with dp_shard and cp as one dimension, FSDP's
    fsdp_root: DeviceMesh | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def coord(self, dim: str) -> int:
        return self.coords[dim]

    def sub(self, dim: str) -> DeviceMesh | None:
        return self.mesh[dim] if self.mesh is not None and self.sizes[dim] > 1 else None

    @property
    def dp_size(self) -> int:
        return self.sizes["dp_replicate"] * self.sizes["dp_shard"]

    @property
    def dp_rank(self) -> int:
        return self.coord("dp_replicate") * self.sizes["dp_shard"] + self.coord("dp_shard")

    @property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.sizes["pp"] - 1

    def dp_mesh(self) -> DeviceMesh | None:
        """FSDP's mesh: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) for HSDP; None if dp = 1.
        With context parallel, dp_shard·cp: the ranks of a cp group hold the same weights and
        each reduces the gradients of its share of the tokens."""
        if self.mesh is None or self.dp_size * self.sizes["cp"] == 1:
            return None
        mesh, shard = (self.fsdp_root, "dp_shard_cp") if self.fsdp_root is not None else (self.mesh, "dp_shard")
        if self.sizes["dp_replicate"] > 1:
            return mesh["dp_replicate", shard]
        return mesh[shard]


def device_for_rank(requested: str) -> torch.device:
    """torchrun's LOCAL_RANK picks the GPU; CPU runs stay on the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init(cfg: RunConfig, device: torch.device) -> Dist:
    """Join the torchrun process group and build the 5-D mesh (pp, dp_replicate, dp_shard, cp, tp)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sizes = cfg.parallel.sizes(world)
    check_layout(cfg, sizes)
    if world == 1:
        return Dist(sizes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    mesh = init_device_mesh(device.type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    coords = {d: mesh[d].get_local_rank() for d in MESH_DIMS}
    fsdp_root = None
    if sizes["cp"] > 1:  # a second mesh over the same ranks (cp is next to dp_shard): no flattening
        dims = ("pp", "dp_replicate", "dp_shard_cp", "tp")
        fsdp_root = init_device_mesh(device.type, (sizes["pp"], sizes["dp_replicate"], sizes["dp_shard"] * sizes["cp"],
                                                   sizes["tp"]), mesh_dim_names=dims)
    return Dist(sizes, dist.get_rank(), world, mesh, coords, fsdp_root)


def check_layout(cfg: RunConfig, sizes: dict[str, int]) -> None:
    """Errors for layouts the model or batch cannot be split into, naming the fields."""
    m, tp, pp = cfg.model, sizes["tp"], sizes["pp"]
    for name, value in (("model.heads", m.heads), ("model.mlp_hidden (width x mlp_ratio)", m.mlp_hidden),
                        ("text.max_length", cfg.text.max_length)):
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} must divide {name} = {value}")
    stages = pp * (cfg.parallel.virtual_stages if cfg.parallel.pp_schedule == "interleaved-1f1b" else 1)
    if pp > 1 and m.depth + m.single_depth < stages:
        raise ConfigError(f"parallel.pp: {stages} pipeline stages need at least as many blocks, "
                          f"the model has {m.depth + m.single_depth}")
    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    for i, stage in enumerate(cfg.stages or [cfg.stage_at(0)]):
        if stage.batch_size % dp:
            where = f"stages[{i}].batch_size" if cfg.stages else "train.batch_size"
            raise ConfigError(f"{where} = {stage.batch_size} must be divisible by the {dp} data-parallel ranks")
        if (stage.batch_size // dp) % microbatches(cfg, sizes):
            raise ConfigError(f"parallel.microbatches = {microbatches(cfg, sizes)} must divide the per-rank "
                              f"batch {stage.batch_size // dp}")
    _check_context_parallel(cfg, sizes)


def _check_context_parallel(cfg: RunConfig, sizes: dict[str, int]) -> None:
    """cp splits each stream's tokens (after TP's split of the same tokens) and the heads TP left."""
    cp, tp, m = sizes.get("cp", 1), sizes["tp"], cfg.model
    if cp == 1:
        return
    if cfg.parallel.cp_attention == "ulysses" and (m.heads // tp) % cp:
        raise ConfigError(f"parallel.cp={cp} must divide the heads each tensor-parallel rank holds "
                          f"(model.heads / parallel.tp = {m.heads // tp}) under parallel.cp_attention=ulysses; "
                          "parallel.cp_attention=ring has no such limit")
    if cfg.text.max_length % (cp * tp):
        raise ConfigError(f"parallel.cp x parallel.tp = {cp * tp} must divide text.max_length = {cfg.text.max_length}")


def microbatches(cfg: RunConfig, sizes: dict[str, int]) -> int:
    """Chunks of each rank's batch per step: the pipeline's microbatches, or gradient
    accumulation steps without one (default: one per pipeline stage, 1 without a pipeline)."""
    p = cfg.parallel
    if p.microbatches or sizes["pp"] == 1:
        return p.microbatches or 1
    return sizes["pp"] * (p.virtual_stages if p.pp_schedule == "interleaved-1f1b" else 1)


def keeps_params(cfg: RunConfig, sizes: dict[str, int]) -> bool:
    """Does FSDP keep gathered parameters from the step's first forward to its last backward
    (``parallel.reshard``; auto: with a pipeline)?"""
    r = cfg.parallel.reshard
    return sizes["pp"] > 1 if r == "auto" else r == "after-step"


# -- pipeline split -------------------------------------------------------------------------
def block_names(model: MMDiT) -> list[tuple[str, str]]:
    return [("double_blocks", k) for k in model.double_blocks] + [("single_blocks", k) for k in model.single_blocks]


def split_points(costs: list[float], n: int) -> list[int]:
    """Cut a list of block costs into n contiguous groups of ~equal cost; returns n+1 bounds."""
    total, bounds, acc = sum(costs), [0], 0.0
    for i, c in enumerate(costs):
        acc += c
        want = len(bounds)  # next boundary index
        left = len(costs) - (i + 1)
        if want < n and (acc >= total * want / n or left == n - want):
            bounds.append(i + 1)
    bounds += [len(costs)] * (n + 1 - len(bounds))
    return bounds


def stage_module(model: MMDiT, stage: int, n: int) -> MMDiT:
    """A copy of ``model`` keeping stage ``stage`` of ``n``: its blocks, plus the embedders on the
    first stage and the output layer on the last. Parameter names stay those of the full model.

    Double- and single-stream blocks cost the same per token (4·W² + 2·W·M multiply-adds for the
    projections and MLP, plus attention), so equal FLOPs means equal block counts."""
    names = block_names(model)
    bounds = split_points([1.0] * len(names), n)
    keep = set(names[bounds[stage]:bounds[stage + 1]])
    part = copy.deepcopy(model)
    for kind, key in names:
        if (kind, key) not in keep:
            del getattr(part, kind)[key]
    if stage > 0:
        part.img_in = part.txt_in = part.t_embed = part.size_embed = part.pooled_embed = None
    if stage < n - 1:
        part.final_mod = part.final = None
    return part


def stage_ids(d: Dist, cfg: RunConfig) -> list[int]:
    """Stages held by this rank: r, r+pp, ... (loop order; interleaved schedules hold several)."""
    v = cfg.parallel.virtual_stages if cfg.parallel.pp_schedule == "interleaved-1f1b" else 1
    return [d.pp_rank + i * d.sizes["pp"] for i in range(v)]


# -- tensor parallel -----------------------------------------------------------------------
def apply_tp(model: MMDiT, tp: DeviceMesh) -> None:
    """Shard every block over ``tp`` (see model/sequence_parallel.py for the activations)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # modulation: column-parallel compute, replicated (B, 6W) result (a small all-gather)
    mod = ColwiseParallel(output_layouts=Replicate(), use_local_output=False)
    col, row = ColwiseParallel(), RowwiseParallel(output_layouts=Shard(1))
    plans = {
        "double_blocks": {"img_mod": mod, "txt_mod": mod, "img_qkv": col, "txt_qkv": col,
                          "img_proj": row, "txt_proj": row, "img_mlp.fc1": col, "img_mlp.fc2": row,
                          "txt_mlp.fc1": col, "txt_mlp.fc2": row},
        "single_blocks": {"mod": mod, "qkv": col, "mlp_in": col, "proj": row, "mlp_out": row},
    }
    model.tp = tp
    for kind, plan in plans.items():
        for block in getattr(model, kind).values():
            parallelize_module(block, tp, plan)
            for name in ("q_norm", "k_norm"):  # replicated; gradients summed over the heads' ranks
                p = getattr(block, name)
                setattr(block, name, nn.Parameter(distribute_tensor(p.data, tp, [Replicate()])))
            block.tp = tp


# -- context parallel ------------------------------------------------------------------------
def apply_cp(model: MMDiT, cp: DeviceMesh, attention: str = "ulysses") -> None:
    """The model keeps this rank's 1/cp of the tokens. Ulysses: every block all-to-alls around
    attention (model/sequence_parallel.py); ring: keys and values go around the cp group
    (model/ring_attention.py). Nothing to shard: FSDP spans dp_shard·cp."""
    model.cp, model.ring = cp, attention == "ring"
    for kind in ("double_blocks", "single_blocks"):
        for block in getattr(model, kind).values():
            if model.ring:
                block.ring = cp
            else:
                block.cp = cp


# -- activation checkpointing and compile ----------------------------------------------------
def _save_matmuls_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    # every SDPA backend torch may pick (cuDNN's on an H100 in some torch versions): one left out
    # would rerun each block's attention forward in the backward
    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten._scaled_dot_product_efficient_attention.default,
           torch.ops.aten._scaled_dot_product_flash_attention.default,
           torch.ops.aten._scaled_dot_product_cudnn_attention.default,
           torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default,
           torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
           # what the row-parallel linears reduce-scatter (TP): kept, the recompute does not send
           # it again (tests/count_collectives.py: tp=2 x cp=2, 84 reduce-scatters per rank as
           # without checkpointing, not 120); the all-gathered inputs are sent again (keeping them
           # costs tp x), and so are context parallel's all-to-alls: their outputs are the QKV
           # matmul's again in another layout, and keeping both made a block keep more than
           # without checkpointing (cp=2: 30.4 / 30.3 bytes per token and unit of width, double /
           # single-stream, against 30.5 / 24.3 none and 22.4 / 22.3 now; tests/block_memory.py)
           torch.ops._c10d_functional.reduce_scatter_tensor.default}
    for name in ("qk_norm_attention_fwd", "ring_attention_fwd"):  # kiln's attentions: one op each
        kiln_attn = getattr(torch.ops.kiln, name, None)
        if kiln_attn is not None:
            ops.add(kiln_attn.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_ac(model: MMDiT, mode: str, compiled: bool = False) -> None:
    """full: keep only each block's inputs, recompute the block in backward. selective: keep
    matmul, attention and TP / CP collective outputs, recompute norms, modulation and
    activations (cheap, and most of the activation bytes at large width), on the kinds of block
    where that keeps less than no checkpointing (kiln.engine.scaling.checkpointed: since Dec 8
    none, the blocks keeping neither their gated branches nor their modulated inputs without it,
    layers.gated_residual and RemadeInputLinears). Under tensor
    parallelism the blocks left unchecked keep their all-gathered inputs as this rank's rows
    (sequence_parallel.Regather); compiled, the compiler decides what they keep."""
    from kiln.engine.scaling import checkpointed

    t, cp = (mesh.size() if mesh is not None else 1 for mesh in (model.tp, model.cp))
    for kind in ("double_blocks", "single_blocks"):
        blocks = getattr(model, kind).values()
        if checkpointed(mode, t, cp, single=kind == "single_blocks", ring=model.ring):
            for block in blocks:
                checkpoint_block(block, mode)
        elif t > 1 and not compiled:
            for block in blocks:
                block.forward = Regather(block.forward)  # on the instance: parameter names stay


def checkpoint_block(block: nn.Module, mode: str) -> None:
    """Run ``block`` under activation checkpointing, ``mode`` selective or full."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    kwargs = {"use_reentrant": False}
    if isinstance(block.forward, Regather):  # its saved-tensor hooks would hide the saves from checkpoint's
        block.forward = block.forward.forward
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _save_matmuls_policy())
    # forward is replaced on the instance, not wrapped in a module: parameter names stay
    block.forward = _Checkpointed(block.forward, checkpoint, kwargs)


class _Checkpointed:
    """``forward`` under activation checkpointing. torch.compile traces this call (checkpoint
    becomes a region its partitioner recomputes, with the selective policy), while a
    functools.partial of checkpoint made dynamo skip the whole block (torch 2.14: no graph, the
    block ran eagerly, silently). An object, not a closure: a deep copy of the block gets a
    wrapper of its own forward."""

    def __init__(self, forward, checkpoint, kwargs):
        self.forward, self.checkpoint, self.kwargs = forward, checkpoint, kwargs

    def __call__(self, *args):
        return self.checkpoint(self.forward, *args, **self.kwargs)


def apply_compile(model: MMDiT) -> None:
    """torch.compile each block. Under tensor parallel with static shapes: DTensor's sharding
    propagation fails on symbolic sizes (torch 2.14: "unhashable type: non-nested SymInt" at the
    second bucket shape), so each batch shape gets its own graph: up to 64 per block code
    (double- and single-stream blocks share one under checkpointing), not dynamo's default 8,
    past which further shapes would run eagerly."""
    dynamic = None if model.tp is None else False
    if dynamic is False:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for kind in ("double_blocks", "single_blocks"):
        for block in getattr(model, kind).values():
            block.compile(dynamic=dynamic)  # in place: parameter names stay


# -- FSDP2 ------------------------------------------------------------------------------------
def apply_fsdp(model: MMDiT, mesh: DeviceMesh, dtype: torch.dtype | None, keep_params: bool) -> None:
    """Shard every block and the root; ``dtype`` (the autocast dtype) is what parameters are
    gathered in, while shards and the gradient reduction stay fp32. ``keep_params``: no reshard
    after forward (see ``keeps_params``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None \
        else MixedPrecisionPolicy()
    for kind in ("double_blocks", "single_blocks"):
        for block in getattr(model, kind).values():
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not keep_params)
    # the root's own parameters (embedders, output layer) are the first the backward needs: None
    # keeps them gathered (FSDP's root default); True would free and gather them again at once
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False if keep_params else None)


def build_parts(cfg: RunConfig, d: Dist, device: torch.device, dtype: torch.dtype | None) -> list[MMDiT]:
    """The model pieces this rank trains: the whole model, or its pipeline stages; sharded."""
    torch.manual_seed(cfg.seed)
    full = MMDiT(cfg.model)  # same init on every rank and in a single process
    if d.sizes["pp"] > 1:
        n = d.sizes["pp"] * len(stage_ids(d, cfg))
        parts = [stage_module(full, s, n) for s in stage_ids(d, cfg)]
    else:
        parts = [full]
    for part in parts:
        part.to(device)
        if d.sub("tp") is not None:
            apply_tp(part, d.sub("tp"))
        if d.sub("cp") is not None:
            apply_cp(part, d.sub("cp"), cfg.parallel.cp_attention)
        apply_ac(part, cfg.parallel.activation_checkpoint, compiled=cfg.parallel.compile)
        if cfg.parallel.compile:
            apply_compile(part)
        if d.dp_mesh() is not None:
            apply_fsdp(part, d.dp_mesh(), dtype, keeps_params(cfg, d.sizes))
    return parts


def before_microbatch(parts: list[nn.Module], last: bool, sync: str, keep_params: bool) -> None:
    """What FSDP does after the next backward, while accumulating micro-batches.

    Reductions, sync=every: reduce-scatter each micro-batch into the sharded gradients (no extra
    memory); HSDP's all-reduce across replicas, the inter-node one, runs after the last only.
    sync=last: nothing before the last micro-batch (the unsharded gradients stay on the rank, fp32).
    keep_params: the gathered parameters stay until the last micro-batch's backward is done."""
    from torch.distributed.fsdp import FSDPModule

    for part in parts:
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(last or sync == "every")  # sets the all-reduce too: first
            part.set_requires_all_reduce(last)
            part.set_reshard_after_backward(last or not keep_params)


# -- pipeline schedule -------------------------------------------------------------------------
class Pipeline:
    """One torch schedule (one batch shape) and its stages, holding receive memory only while it runs.

    torch's stages keep a receive buffer per micro-batch for the carrier coming forward (stages
    after the first) and one for its gradient coming back (stages before the last), from their
    first step on: up to 2 x (stage batch) x S x W values per schedule. With a schedule per
    aspect bucket (xl at 2048 px, 4 images per stage, bf16: 0.75 GiB each, 9 buckets 6.8 GiB,
    x the resolution stages) that crowds out activations, so between steps the buffers' storage
    is freed (resized to 0, as FSDP2 frees unsharded parameters) and taken back from the caching
    allocator before the schedule's next step."""

    def __init__(self, schedule, stages: list):
        self.schedule, self.stages = schedule, stages

    def buffers(self) -> list[torch.Tensor]:
        """The stages' receive buffers (forward activations and backward gradients), one per microbatch."""
        out = []
        for stage in self.stages:
            for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values()):  # per micro-batch
                out += [i.buffer for i in infos if isinstance(getattr(i, "buffer", None), torch.Tensor)]
        return out

    def step(self, *inputs, target=None, losses=None) -> None:
        for b in self.buffers():  # empty after the last step; recv overwrites every byte
            b.untyped_storage().resize_(b.numel() * b.element_size())
        self.schedule.step(*inputs, target=target, losses=losses)
        for stage in self.stages:  # the input buffers' gradients (sent back already) and cached outputs
            stage.clear_runtime_states()
        for b in self.buffers():
            b.untyped_storage().resize_(0)


def _reduce_like_accumulation(stage, sync: str, keep_params: bool) -> None:
    """A stage's backward of each micro-batch reduces and reshards as gradient accumulation does
    without a pipeline (``before_microbatch``), not as torch's stages do: they keep the unsharded
    fp32 gradients and the gathered parameters of every FSDP block until the step's last
    micro-batch (xl at 2048 px, pp=2: 15.5 + 7.8 GiB per GPU), whatever accumulate_sync and
    reshard say."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.pipelining._backward import stage_backward

    if not isinstance(stage.submod, FSDPModule):
        return
    torch_backward = stage.backward_maybe_with_nosync

    def backward(backward_type, bwd_kwargs, last_backward=False):
        if backward_type != "full":  # zero-bubble schedules' split backward: not one of kiln's
            return torch_backward(backward_type, bwd_kwargs, last_backward)
        stage.submod.set_is_last_backward(False)  # the schedule's reduce step finalizes, as in torch's
        before_microbatch([stage.submod], last_backward, sync, keep_params)
        return stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"]), None

    stage.backward_maybe_with_nosync = backward


def build_schedule(cfg: RunConfig, d: Dist, parts: list[MMDiT], device: torch.device, loss_fn) -> Pipeline:
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    ids = stage_ids(d, cfg)
    n = d.sizes["pp"] * len(ids)
    group = d.mesh["pp"].get_group()
    stages = [PipelineStage(part, sid, n, device, group=group) for part, sid in zip(parts, ids, strict=True)]
    for stage in stages:
        _reduce_like_accumulation(stage, cfg.parallel.accumulate_sync, keeps_params(cfg, d.sizes))
    mb = microbatches(cfg, d.sizes)
    if cfg.parallel.pp_schedule == "interleaved-1f1b":
        return Pipeline(ScheduleInterleaved1F1B(stages, n_microbatches=mb, loss_fn=loss_fn), stages)
    kind = ScheduleGPipe if cfg.parallel.pp_schedule == "gpipe" else Schedule1F1B
    return Pipeline(kind(stages[0], n_microbatches=mb, loss_fn=loss_fn), stages)


# -- gradients across the layout -----------------------------------------------------------------
def _local_sq_norm(g: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Squared norm of this rank's piece, and the mesh groups it must be summed over."""
    if not isinstance(g, DTensor):
        return g.detach().float().pow(2).sum(), ()
    if any(isinstance(p, Partial) for p in g.placements):  # a partial sum: finish it first
        g = g.redistribute(g.device_mesh, [Replicate() if isinstance(p, Partial) else p for p in g.placements])
    groups = tuple(g.device_mesh.get_group(i) for i, p in enumerate(g.placements) if isinstance(p, Shard))
    return g.to_local().detach().float().pow(2).sum(), groups


@torch.no_grad()
def grad_norm(parts: list[nn.Module], d: Dist) -> torch.Tensor:
    """Global gradient norm over every shard, stage and TP piece (the same value on every rank)."""
    grads = [p.grad for part in parts for p in part.parameters() if p.grad is not None]
    if not d.enabled:
        return torch.nn.utils.get_total_norm(grads)
    sums: dict[tuple, list] = {}  # mesh groups to sum over -> this rank's squared norms
    for g in grads:
        sq, groups = _local_sq_norm(g)
        sums.setdefault(groups, []).append(sq)
    total = torch.zeros((), device=grads[0].device if grads else "cpu")
    for groups, squares in sums.items():  # one all-reduce per kind of sharding, not per tensor
        value = torch.stack(squares).sum()
        for g in groups:
            dist.all_reduce(value, group=g)
        total = total + value
    if d.sizes["pp"] > 1:  # each stage holds different parameters
        dist.all_reduce(total, group=d.mesh["pp"].get_group())
    return total.sqrt()


def clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that brings a gradient of global norm ``norm`` down to ``max_norm`` (at most 1)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)  # stays on the device: no host sync per step


@torch.no_grad()
def mul_grads_(parts: list[nn.Module], coef: torch.Tensor) -> None:
    """Multiply every gradient (this rank's pieces) by a device scalar, in one foreach pass."""
    grads = [p.grad for part in parts for p in part.parameters() if p.grad is not None]
    torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)


def global_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """Losses averaged over data-parallel ranks; on pipeline layouts sent from the last stage."""
    if not d.enabled:
        return values
    v = values.detach().clone() if d.last_stage else torch.zeros_like(values)
    dist.all_reduce(v)  # sum over every rank: dp ranks of the last stage x cp token shares x tp copies
    return v / (d.dp_size * d.sizes["cp"] * d.sizes["tp"])


def global_max(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """The largest value over every rank (each rank's own, e.g. its memory)."""
    if d.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when it is true on one (a Ctrl-C seen by some ranks stops all)."""
    if not d.enabled:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(t.item())


_CPU_GROUP = None


def _cpu_group():
    """A gloo group for small host-side values (NCCL only moves GPU tensors)."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _CPU_GROUP


@torch.no_grad()
def full_weights(named: dict[str, torch.Tensor], d: Dist) -> dict[str, torch.Tensor] | None:
    """Unsharded copies of ``named`` (parameter name -> tensor, possibly DTensor) on rank 0.

    Every rank must call it. Shards are all-gathered within each stage; stages other than the
    first send theirs to rank 0 from their (dp 0, cp 0, tp 0) rank: the one in rank 0's pp group.
    Returns None on other ranks."""
    full = {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for n, t in named.items()}
    if not d.enabled:
        return full
    if d.sizes["pp"] > 1 and d.dp_rank == 0 and d.coord("cp") == 0 and d.coord("tp") == 0:
        pieces = [None] * d.sizes["pp"] if d.rank == 0 else None
        dist.gather_object({n: t.cpu() for n, t in full.items()}, pieces, dst=0, group=d.mesh["pp"].get_group())
        if d.rank == 0:
            device = next(iter(full.values())).device
            full = {n: t.to(device) for piece in pieces for n, t in piece.items()}
    return full if d.rank == 0 else None


def shutdown(d: Dist | None = None) -> None:
    """Tear the process groups down once every rank is done with them (``d`` None: whatever
    ``torch.distributed`` has, for entries that joined it themselves).

    The barrier first: a rank can finish its last collective (it has all it needs) while a peer
    still drains that collective's sends, and tearing gloo's pairs down then would race. Then
    :func:`release_process_groups`, so that no group outlives the interpreter.
    """
    global _CPU_GROUP
    if (d is None or d.enabled) and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _CPU_GROUP = None
        release_process_groups()


def release_process_groups() -> None:
    """Free the process groups ``destroy_process_group`` only unregistered.

    A group some object still holds lives until the interpreter exits, its gloo threads with it
    (2 ``pt_gloo_runloop`` and a ``gloo_tcp_loop`` per group); a C++ thread that then needs the
    GIL is ended by the finalizing interpreter, and the rank dies by SIGABRT ("terminate called
    without an active exception", no Python frame) after its work is done: one torchrun job of
    ~40 in 2 CI runs of Dec 7 (test_muon, tp=2), and 2 of ~100 runs of the ring attention entry
    here. Holders found by counting those threads after destroy_process_group (torch 2.14):
    DeviceMesh (``_pg_registry``; meshes stay alive in DTensor's sharding caches), FSDP's mesh
    info (``shard_process_group``) and torch._dynamo if first imported while a group exists (it
    keeps the default group; the first call of any custom op imports it), hence the import at
    the top of this module. Meshes and mesh infos drop their groups here; they are dead anyway
    once the groups are destroyed (tests/teardown_ranks.py: no gloo thread left). Only these
    types: a scan of every torch object's attributes met dead weakref proxies under compile.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import DataParallelMeshInfo

    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: a dead weakref proxy raises on any look inside it
        if issubclass(kind, DeviceMesh):
            getattr(obj, "_pg_registry", {}).clear()
        elif issubclass(kind, DataParallelMeshInfo):
            for name in ("shard_process_group", "replicate_process_group", "reduce_scatter_process_group"):
                if name in vars(obj):
                    setattr(obj, name, None)
    gc.collect()
