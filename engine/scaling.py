"""Scaling model: memory per GPU, traffic per step and a modelled step time for any layout.

``kiln model scaling PRESET`` prints, per GPU count, the layout with the shortest modelled step
that fits in 80 GiB. These are formulas with stated constants, not measurements.

Memory (bytes per GPU), with P parameters sharded over f·tp·pp, f = dp_shard·cp (FSDP's ranks):
  weights fp32 4P + gradients fp32 4P + AdamW 8P + EMA fp32 4P, all / (f·tp·pp)
  + gathered bf16 parameters: two blocks at once (FSDP prefetch), 2·2·P_block/tp, when they are
    freed after each forward (parallel.reshard=after-forward); the whole stage's, 2P/(tp·pp), when
    they are kept through the step (after-step; auto: with a pipeline)
  + activations per token per block, measured (tests/saved_bytes.py: what one block's forward
    leaves for its backward, bf16, Triton attention, MLP 4·W): without checkpointing 20·W bytes
    in a double-stream block (block and residual inputs, QKV, attention output, the MLP hidden
    once: GELU is recomputed; not the gated branches, model/layers.py's gated_residual, nor the
    modulated inputs, made again from the block and residual inputs, RemadeInputLinears; both
    except under tp: +8·W/tp; the gated branches kept too with fewer than LEAN_GATE_TOKENS
    tokens a sample on a rank: +4·W), 18·W in a single-stream one (+4·W/tp, +2·W); 22·W selective
    (matmul and attention outputs kept, block input; applied only to the kinds of block where
    it keeps less than none, :func:`checkpointed`: since Dec 8 none), 2·W full (block input); / cp
    (context parallel keeps 1/cp of the tokens) and / tp (sequence- or head-sharded), except
    what every TP rank holds whole under selective: the partial sums out of the two
    row-parallel matmuls (4·W). Without checkpointing the all-gathered inputs of the
    column-parallel matmuls are kept as this rank's rows and gathered again in the backward
    (sequence_parallel.Regather, as Megatron-LM; whole they were 4·W, a single-stream block's
    QKV and MLP share one, 2·W). Selective also keeps the two reduce-scatters'
    outputs (+4·W/tp), not the all-to-alls' (the QKV matmul's output again, +8·W/tp); without
    checkpointing, a block under Ulysses cp also keeps the attention output its projections read
    (+2·W: it comes back from its all-to-all in another layout than the one attention keeps;
    ring attention's output stays in place). Each term measured under tp=2 and cp=2, either cp
    attention (tests/block_memory.py); for the micro-batch and the
    blocks of the stage (1F1B keeps pp micro-batches in flight on stage 0, each over 1/pp of
    the blocks; without a pipeline, gradient accumulation over K micro-batches keeps one,
    dp_batch / K images)
  + with optim=muon, the block matrices' P_m parameters keep one fp32 momentum (4 bytes) instead
    of AdamW's two (8): 4·P_m/(f·tp·pp) less
  + unsharded fp32 gradients kept between micro-batches under FSDP, 4P/(tp·pp): with
    accumulate_sync=last (a pipeline's stages reduce and reshard as gradient accumulation does,
    kiln.engine.parallel._reduce_like_accumulation; torch's own keep both until the last)
  + with a pipeline, the receive buffers of the running schedule: a middle stage's carrier
    forward and its gradient back for every micro-batch, 2·2·dp_batch·S·W/cp bf16 bytes
    (the other schedules' are freed between steps, kiln.engine.parallel.Pipeline).
Traffic (bytes sent per GPU per step; ring collectives move (n-1)/n of the data):
  FSDP  all-gather bf16 params in forward and again in backward, reduce-scatter fp32 grads:
        (2 + 2 + 4)·P/tp·(f-1)/f, f = dp_shard·cp; accumulating K micro-batches gathers for each
        and reduce-scatters after each ((4K + 4K)·P/tp·...) or, with accumulate_sync=last, once
        ((4K + 4)·P/tp·...); reshard=after-step gathers once per step (2·P/tp·... instead of
        4K·P/tp·...); a pipeline alike, over its K = 2·pp micro-batches and P/(tp·pp);
        HSDP's all-reduce across replicas runs once either way
  HSDP  all-reduce of the fp32 gradient shard across replicas: 2·4P/(f·tp·pp)·(r-1)/r
  TP    per block and image: 4 sequence all-gathers / reduce-scatters of S·W bf16 values forward,
        4 backward: 16·S·W·(t-1)/t
  CP    per block of the stage and image: all-to-alls of q, k, v and the output, this rank's S/cp tokens of
        W/tp bf16 features each, forward and backward: 16·S·W/(tp·cp)·(cp-1)/cp;
        ring attention (cp_attention="ring", :func:`ring_bytes`) sends K, V (bf16) to the next
        rank cp-1 times forward, q and dO (and two fp32 numbers a row and head) cp-1 times
        backward, and the fp32 dQ cp times: ((8 + 8/D)·(cp-1) + 4·cp)·S·W/(tp·cp)
  Muon  per step, each matrix's bf16 momentum shards to its owner rank and the result's shards
        back, two all-to-alls over the f·tp ranks that shard it: 2·2·P_m/(f·tp·pp)·(N-1)/N,
        N = f·tp; under FSDP x TP (2-D shards) DTensor's all-gathers, 2·2·P_m/pp·(N-1)/N
  PP    per image and stage boundary: the carrier S·W/cp bf16 forward and its gradient back (each
        cp rank sends its own tokens to its peer in the next stage).
  Activation checkpointing runs forward collectives again in the backward's recompute: full
  all of TP's and CP's (x1.5 their traffic; ring: its forward's again), selective TP's
  all-gathers (x1.25 TP; it keeps the reduce-scatters' outputs) and CP's all-to-alls (x1.5 CP;
  not the ring's: selective keeps its op's output), in the blocks it checkpoints; the blocks
  left unchecked under tp gather their column-parallel inputs again (x1.25 TP). Counted on
  CPU, what was sent (tests/count_collectives.py, tiny recipe, 2 double- and 2 single-stream
  blocks, 3 steps, tp=2 x cp=2, per rank; selective checkpoints no block under tp):
  all-to-alls 48 none / 48 selective / 72 full; DTensor all-gathers 132 / 132 / 150 (none 102
  until Dec 8, before Regather), reduce-scatters 84 / 84 / 120.
A mesh dimension whose ranks span more than one node of 8 (mesh order pp, dp_replicate,
dp_shard, cp, tp; tp innermost) sends over InfiniBand, otherwise over NVLink.
Step time: compute at 50% of 989 TFLOP/s (H100 bf16), 3 forwards' FLOPs per step (backward = 2),
4 with full checkpointing (each block's forward again); selective recomputes only elementwise
ops (norms, modulation, GELU; ~1% of an xl step at HBM speed, uncounted like all elementwise
work in MFU). ``ac="auto"`` tries all three per layout. FSDP/HSDP traffic overlaps compute
(prefetch), TP, Ulysses CP and PP traffic do not; ring attention's overlaps its own blocks'
attention math (each transfer is issued before the block it waits for: 4·S²·W/(tp·cp) FLOPs a
block and image forward, at the same MFU, times the forwards a step runs) and only the rest is
exposed — a model: the ring has not been timed on GPUs; 1F1B with 2 micro-batches per stage idles (pp-1) of
(3pp-1) slots. Muon's step follows the backward: its Newton-Schulz FLOPs (5 iterations of
4·a²·b + 2·a³ per a x b matrix, a <= b), 1/N of them per rank, and its all-to-alls add to it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kiln.engine.muon import NS_STEPS
from kiln.model.layers import LEAN_GATE_TOKENS
from kiln.model.mmdit import MMDiTConfig
from kiln.model.presets import count_params, forward_flops

GIB = 2**30
# (double-stream block, single-stream block); test_activation_bytes_are_what_a_block_keeps
ACT_BYTES_PER_TOKEN_WIDTH = {"none": (20, 18), "selective": (22, 22), "full": (2, 2)}
# kept without checkpointing only under tp, where the linears' weights are DTensors: the gated
# branches (layers.gated_residual: the reduce-scattered rows go through autograd's multiply,
# which keeps them for the gate's gradient; 4, 2) and the modulated inputs' rows
# (sequence_parallel.Regather, not layers.RemadeInputLinears; 4, 2)
TP_UNFUSED_BYTES = {"none": (8, 4), "selective": (0, 0), "full": (0, 0)}
# the gated branches again, at tp=1 with fewer than layers.LEAN_GATE_TOKENS tokens a sample on a
# rank (2048: 512 px and below for the latent presets), where keeping them is the faster way
SHORT_GATED_BYTES = {"none": (4, 2), "selective": (0, 0), "full": (0, 0)}
# of those, held whole by every TP rank; none: sequence_parallel.Regather keeps the gathered inputs' rows
TP_WHOLE_BYTES = {"none": (0, 0), "selective": (4, 4), "full": (0, 0)}
TP_KEPT_BYTES = {"none": 0, "selective": 4, "full": 0}  # the reduce-scatters' outputs selective keeps
CP_KEPT_BYTES = {"none": (2, 2), "selective": (0, 0), "full": (0, 0)}  # Ulysses, none: the attention output
# twice, its all-to-all's output too (ring attention keeps no more than without cp)
CP_ATTENTIONS = ("ulysses", "ring")  # parallel.cp_attention
# ring forwards a step sends (full: recomputed); test_ring_sends_again_only_under_full_checkpointing
RING_FORWARDS = {"none": 1, "selective": 1, "full": 2}
FORWARDS_PER_STEP = {"none": 3, "selective": 3, "full": 4}  # in matmul FLOPs
RECOMPUTED_TP = {"none": 1.25, "selective": 1.25, "full": 1.5}  # traffic factor: all-gathers again / all
RECOMPUTED_CP = {"none": 1.0, "selective": 1.5, "full": 1.5}
AC_MODES = tuple(ACT_BYTES_PER_TOKEN_WIDTH)
# H100 SXM: 989 TFLOP/s dense bf16 at an assumed 50% MFU; NVLink 450 GB/s per GPU per direction
# inside a node of 8; InfiniBand 400 Gb/s = 50 GB/s per GPU between nodes.
GPU_FLOPS, MFU, NVLINK, IB, NODE = 989e12, 0.5, 450e9, 50e9, 8


@dataclass
class Estimate:
    layout: dict[str, int]
    memory_gib: float
    intra_gib: float  # bytes per GPU per step over NVLink
    inter_gib: float  # bytes per GPU per step between nodes
    seconds: float  # modelled step time
    images: int  # global batch
    accumulate: int = 1  # gradient-accumulation micro-batches (parallel.microbatches, no pipeline)
    sync: str = "every"  # parallel.accumulate_sync
    reshard: str = "after-forward"  # parallel.reshard
    ac: str = "selective"  # parallel.activation_checkpoint
    optim: str = "adamw"  # optim.name
    cp_attention: str = "ulysses"  # parallel.cp_attention

    def row(self, gpus: int) -> str:
        lay = " ".join(f"{k}={v}" for k, v in self.layout.items() if v > 1) or "single GPU"
        pp = self.layout["pp"]
        if pp == 1:  # the config's defaults: accumulate_sync=every, reshard=after-forward
            lay += f" microbatches={self.accumulate} accumulate_sync={self.sync}" if self.accumulate > 1 else ""
            lay += " reshard=after-step" if self.reshard == "after-step" else ""
        else:  # the model's 2 micro-batches per stage (the config's default is 1); reshard=after-step
            lay += f" microbatches={2 * pp}" + (" accumulate_sync=last" if self.sync == "last" else "")
            lay += " reshard=after-forward" if self.reshard == "after-forward" else ""
        lay += f" activation_checkpoint={self.ac}"
        lay += " optim=muon" if self.optim == "muon" else ""
        lay += " cp_attention=ring" if self.layout.get("cp", 1) > 1 and self.cp_attention == "ring" else ""
        return (f"| {gpus} | {lay} | {self.memory_gib:.1f} | {self.intra_gib:.2f} | {self.inter_gib:.2f} | "
                f"{self.seconds:.2f} | {self.images / self.seconds / gpus:.2f} |")


def tokens(cfg: MMDiTConfig, resolution: int, text_tokens: int) -> tuple[int, int]:
    side = resolution // 8 if cfg.in_channels != 3 else resolution  # latent presets: 8x VAE
    n = (side // cfg.patch_size) ** 2
    return n + text_tokens, side


def _crosses_nodes(stride: int, size: int) -> bool:
    """Does a mesh dimension with this stride and size span more than one node of 8 GPUs?"""
    return size > 1 and stride * size > NODE


def kept_bytes(ac: str, t: int, cp: int, single: bool, ring: bool, short: bool = False) -> float:
    """Bytes per token and unit of width a block keeps with mode ``ac`` applied to it (the policy
    forced, for selective: see checkpointed and act_bytes); ``short``: fewer than
    layers.LEAN_GATE_TOKENS tokens a sample on a rank, where the gated residuals keep their branches."""
    whole = TP_WHOLE_BYTES[ac][single] if t > 1 else 0
    kept = (TP_KEPT_BYTES[ac] + TP_UNFUSED_BYTES[ac][single]) * (t > 1)
    kept += SHORT_GATED_BYTES[ac][single] * (short and t == 1)
    kept += CP_KEPT_BYTES[ac][single] * (cp > 1 and not ring)
    return (ACT_BYTES_PER_TOKEN_WIDTH[ac][single] - whole + kept) / t + whole


def checkpointed(ac: str, t: int, cp: int, single: bool = False, ring: bool = False) -> bool:
    """Does ``parallel.activation_checkpoint=ac`` checkpoint this kind of block in this layout?
    full: always; none: never; selective: where its policy keeps fewer bytes than no
    checkpointing. Since Dec 8 no layout: without tp a block keeps 20 / 18 bytes per token and
    unit of width without checkpointing (double / single-stream; 22 / 20 under Ulysses cp, the
    attention output's second layout) against the policy's 22 / 22, and recomputes nothing;
    under tp the policy keeps the row-parallel matmuls' partial sums whole on every rank, while
    without checkpointing a rank keeps only its rows of everything (tp=2: 15 against 14 and 11).
    Until then the double-stream blocks without tp kept 28, then 24, and selective (22) took
    them; the single-stream ones 22, and selective took them under Ulysses (22 against 24);
    measured in tests/block_memory.py. Decided once for every bucket, on long sequences: with
    fewer than layers.LEAN_GATE_TOKENS tokens a sample (a rank's) none keeps 24 / 20, 2 more
    than the policy in a double-stream block, where activations are small anyway."""
    if ac != "selective":
        return ac == "full"
    return kept_bytes("selective", t, cp, single, ring) < kept_bytes("none", t, cp, single, ring)


def act_bytes(ac: str, t: int, cp: int, single: bool = False, ring: bool = False, short: bool = False) -> float:
    """Activation bytes per token (of this rank's S/cp) and unit of width, per double-stream
    block (``single``: per single-stream block; ``ring``: cp by ring attention; ``short``: fewer
    than layers.LEAN_GATE_TOKENS tokens a sample on a rank), of the mode
    ``ac`` applies to that block (:func:`checkpointed`)."""
    mode = ac if ac == "none" or checkpointed(ac, t, cp, single, ring) else "none"
    return kept_bytes(mode, t, cp, single, ring, short)


def recomputed(table: dict[str, float], ac: str, cfg: MMDiTConfig, t: int, cp: int, ring: bool) -> float:
    """A collective's traffic factor under ``ac`` (``table``: RECOMPUTED_TP or _CP), averaged
    over the blocks: those ``ac`` does not checkpoint send what they send without checkpointing
    (under tp, the all-gathers again: sequence_parallel.Regather)."""
    kinds = ((cfg.depth, False), (cfg.single_depth, True))
    sent = sum(n * table[ac if checkpointed(ac, t, cp, single, ring) else "none"] for n, single in kinds)
    return sent / max(1, cfg.depth + cfg.single_depth)


def ring_bytes(elems: float, cp: int, ac: str = "none", act: int = 2, head_dim: int = 128) -> float:
    """Bytes one rank sends for one ring attention (kiln.model.ring_attention), forward and
    backward, ``elems`` the elements of its K (B·S/cp·H/tp·D) in ``act`` bytes: K and V to the next
    rank cp-1 times in the forward (RING_FORWARDS of them a step); in the backward q and dO with
    lse and delta (fp32, one each a row of ``head_dim``) cp-1 times, the fp32 dQ cp times (the last
    brings it home; one rank sends nothing)."""
    kv = 2 * elems * act
    queries = 2 * elems * act + 2 * 4 * elems / head_dim
    return RING_FORWARDS[ac] * (cp - 1) * kv + (cp - 1) * queries + (cp * 4 * elems if cp > 1 else 0)


def muon_shapes(cfg: MMDiTConfig) -> list[tuple[int, int]]:
    """Shapes of the matrices Muon takes (kiln.engine.optim.muon_params), built on meta."""
    from kiln.engine.optim import muon_params
    from kiln.model.mmdit import MMDiT

    with torch.device("meta"):
        matrices, _ = muon_params(MMDiT(cfg))
    return [tuple(p.shape) for p in matrices]


def muon_step(shapes: list[tuple[int, int]], t: int, f: int, pp: int) -> tuple[float, float]:
    """(bytes each rank sends, FLOPs each rank runs) for Muon's orthogonalisation in one step."""
    n = f * t  # ranks that shard a stage's weights; HSDP replicas repeat their group's share
    p_m = sum(a * b for a, b in shapes)
    flops = sum(NS_STEPS * (4 * min(a, b) ** 2 * max(a, b) + 2 * min(a, b) ** 3) for a, b in shapes) / (pp * n)
    whole = f > 1 and t > 1  # 2-D shards: redistributed through all-gathers
    sent = 2 * 2 * p_m / pp * (n - 1) / n / (1 if whole else n)
    return sent, flops


def estimate(cfg: MMDiTConfig, layout: dict[str, int], dp_batch: int, resolution: int = 1024,
             text_tokens: int = 77, ac: str = "selective", params: int | None = None,
             accumulate: int = 1, sync: str = "every", reshard: str = "auto",
             optim: str = "adamw", shapes: list[tuple[int, int]] | None = None,
             cp_attention: str = "ulysses") -> Estimate:
    """One layout; ``dp_batch`` images per data-parallel rank (shared by its cp·tp·pp GPUs),
    run as ``accumulate`` gradient-accumulation micro-batches when there is no pipeline (a
    pipeline runs 2 per stage), reducing gradients after each or (``sync="last"``) after the
    last, gathering parameters for each forward and backward or (``reshard="after-step"``;
    ``"auto"``: with a pipeline) once per step; ``optim`` adamw or muon
    (``shapes``: :func:`muon_shapes`, computed when not given); ``cp_attention`` ulysses or ring."""
    P = params or count_params(cfg)
    blocks = cfg.depth + cfg.single_depth
    p_block = P / max(1, blocks)  # embedders and output layer are <1% of the larger presets
    r, d, t, pp = (layout[k] for k in ("dp_replicate", "dp_shard", "tp", "pp"))
    cp = layout.get("cp", 1)
    f = d * cp  # FSDP's ranks: a cp group holds the same weights
    S, side = tokens(cfg, resolution, text_tokens)
    W = cfg.width
    muon_sent = muon_flops = p_m = 0
    if optim == "muon":
        shapes = shapes if shapes is not None else muon_shapes(cfg)
        p_m = sum(a * b for a, b in shapes)
        muon_sent, muon_flops = muon_step(shapes, t, f, pp)
    master = ((4 + 4 + 8 + 4) * P - 4 * p_m) / (f * t * pp)
    accumulate = accumulate if pp == 1 else 1
    k = accumulate if pp == 1 else 2 * pp  # micro-batches per step: a pipeline's, 2 per stage
    keep = reshard == "after-step" or (reshard == "auto" and pp > 1)  # gathered once, kept through the step
    gathered = 2 * P / (t * pp) if keep else 2 * 2 * p_block / t
    micro = dp_batch / k
    in_flight = 1 if pp == 1 else pp  # 1F1B: stage 0 holds pp micro-batches
    ring = cp_attention == "ring" and cp > 1
    short = S // cp < LEAN_GATE_TOKENS  # the gated residuals keep their branches
    per_block = (cfg.depth * act_bytes(ac, t, cp, ring=ring, short=short)
                 + cfg.single_depth * act_bytes(ac, t, cp, single=True, ring=ring, short=short)) / blocks
    acts = micro * in_flight * S * (blocks / pp) * W / cp * per_block
    # mesh (pp, dp_replicate, dp_shard, cp, tp): strides t·f·r, t·f, t·cp, t, 1
    held = sync == "last" and k > 1  # no reduction before the last micro-batch
    reductions = 1 if held else k
    unsharded_grads = 4 * P / (t * pp) if held and f * r > 1 else 0
    recv = 2 * 2 * dp_batch * S * W / cp if pp > 1 else 0
    gathers = 1 if keep else 2 * k
    fsdp = ((2 * gathers + 4 * reductions) * P / (t * pp)) * (f - 1) / f
    hsdp = 2 * 4 * P / (f * t * pp) * (r - 1) / r  # after the last micro-batch (set_requires_all_reduce)
    tp_bytes = recomputed(RECOMPUTED_TP, ac, cfg, t, cp, ring) * dp_batch * (blocks / pp) * 16 * S * W * (t - 1) / t
    if ring:
        cp_bytes = dp_batch * (blocks / pp) * ring_bytes(S / cp * W / t, cp, ac, head_dim=cfg.head_dim)
    else:
        cp_bytes = (recomputed(RECOMPUTED_CP, ac, cfg, t, cp, ring) * dp_batch * (blocks / pp)
                    * 16 * S * W / (t * cp) * (cp - 1) / cp)
    pp_bytes = (2 * dp_batch * S * W * 2 / cp) if pp > 1 else 0  # a cp rank sends its S/cp tokens
    comm = [(fsdp, _crosses_nodes(t, f)), (hsdp, _crosses_nodes(t * f, r)), (tp_bytes, False),
            (cp_bytes, _crosses_nodes(t, cp)), (pp_bytes, _crosses_nodes(t * f * r, pp)),
            (muon_sent, _crosses_nodes(1, t * f))]
    inter = sum(b for b, x in comm if x)
    intra = sum(b for b, x in comm if not x)
    flops = FORWARDS_PER_STEP[ac] * forward_flops(cfg, side, side, text_tokens) * dp_batch / (t * pp * cp)
    compute = flops / (GPU_FLOPS * MFU)
    # FSDP / HSDP traffic overlaps compute (prefetch); TP and CP sit on the critical path; 1F1B
    # idles (pp - 1) of (micro-batches + pp - 1) slots
    dp_time = fsdp / (IB if _crosses_nodes(t, f) else NVLINK) + hsdp / (IB if _crosses_nodes(t * f, r) else NVLINK)
    bubble = (pp - 1) / (2 * pp + pp - 1) if pp > 1 else 0.0
    cp_time = cp_bytes / (IB if _crosses_nodes(t, cp) else NVLINK)
    if ring:  # behind the blocks' attention math, all but what outlasts it
        attention = FORWARDS_PER_STEP[ac] * dp_batch * (blocks / pp) * 4 * S * S * W / (t * cp)
        cp_time = max(0.0, cp_time - attention / (GPU_FLOPS * MFU))
    seconds = max(compute, dp_time) / (1 - bubble) + tp_bytes / NVLINK + cp_time + pp_bytes / IB \
        + muon_flops / (GPU_FLOPS * MFU) + muon_sent / (IB if _crosses_nodes(1, t * f) else NVLINK)
    images = dp_batch * d * r
    memory = (master + gathered + acts + unsharded_grads + recv) / GIB
    return Estimate(layout, memory, intra / GIB, inter / GIB, seconds, images, accumulate, sync,
                    "after-step" if keep else "after-forward", ac, optim, cp_attention if ring else "ulysses")


def cp_attentions(layout: dict[str, int], heads: int, allowed=CP_ATTENTIONS) -> list[str]:
    """The cp attentions of ``allowed`` a layout can run: Ulysses where cp divides the heads tp
    leaves, ring wherever tp divides them; ["ulysses"] (no choice to make) without cp."""
    t, cp = layout["tp"], layout.get("cp", 1)
    if cp == 1:
        return ["ulysses"]
    return [a for a in allowed if heads and heads % (t * (cp if a == "ulysses" else 1)) == 0]


def layouts(gpus: int, heads: int = 0, allowed=("ulysses",)):
    """Every layout of ``gpus`` with tp·cp inside a node, cp possible by one of the ``allowed``
    cp attentions (:func:`cp_attentions`; heads 0 = no cp), and powers of two elsewhere."""
    for t, cp, pp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)):
        lay = {"tp": t, "cp": cp}
        if gpus % (t * cp * pp) or t * cp > NODE or not cp_attentions(lay, heads, allowed):
            continue
        dp = gpus // (t * cp * pp)
        for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            if dp % r == 0:
                yield {"dp_replicate": r, "dp_shard": dp // r, "cp": cp, "tp": t, "pp": pp}


def recommend(cfg: MMDiTConfig, gpus: int, global_batch: int, gpu_gib: float = 80.0, resolution: int = 1024,
              ac: str = "selective", optim: str = "adamw",
              cp_attention: str = "auto") -> tuple[Estimate | None, list[Estimate]]:
    """The layout to use: fits in ``gpu_gib`` with 10% headroom, then the shortest modelled step.
    Each layout also tries keeping parameters gathered through the step (reshard=after-step)
    and reducing gradients after each micro-batch or once (accumulate_sync=last); without a
    pipeline, gradient accumulation over 2, 4, ... micro-batches (each costs another all-gather
    unless the parameters are kept); with ``ac="auto"``, each activation-checkpointing mode;
    with ``cp_attention="auto"``, Ulysses and ring where the layout has cp. Of those that fit,
    the fastest, then the fewest micro-batches, then the least memory (then Ulysses)."""
    fits, params = [], count_params(cfg)  # builds the model on meta: once, not per layout
    shapes = muon_shapes(cfg) if optim == "muon" else None
    allowed = CP_ATTENTIONS if cp_attention == "auto" else (cp_attention,)
    for lay in layouts(gpus, cfg.heads, allowed):
        dp = lay["dp_replicate"] * lay["dp_shard"]
        if global_batch % dp or (lay["pp"] > 1 and (global_batch // dp) % (2 * lay["pp"])):
            continue
        dp_batch = global_batch // dp
        options = [estimate(cfg, lay, dp_batch, resolution, ac=mode, params=params, accumulate=k, sync=sync,
                            reshard=reshard, optim=optim, shapes=shapes, cp_attention=attention)
                   for k, sync, reshard in (_accumulations(dp_batch) if lay["pp"] == 1 else _pipeline_options())
                   for mode in (AC_MODES if ac == "auto" else (ac,))
                   for attention in cp_attentions(lay, cfg.heads, allowed)]
        options = [e for e in options if e.memory_gib <= 0.9 * gpu_gib]
        if options:
            fits.append(min(options, key=lambda e: (round(e.seconds, 3), e.accumulate, e.memory_gib,
                                                    e.cp_attention == "ring")))
    fits.sort(key=lambda e: (round(e.seconds, 3), e.layout["tp"] * e.layout["pp"] * e.layout["cp"], e.inter_gib))
    return (fits[0] if fits else None), fits


def _accumulations(dp_batch: int) -> list[tuple[int, str, str]]:
    """(micro-batches, accumulate_sync, reshard) to try without a pipeline."""
    ks = [k for k in (2, 4, 8, 16, 32) if dp_batch % k == 0]
    return [(k, sync, reshard) for k in (1, *ks) for sync in (("every",) if k == 1 else ("every", "last"))
            for reshard in ("after-forward", "after-step")]


def _pipeline_options() -> list[tuple[int, str, str]]:
    """(1, accumulate_sync, reshard) to try with a pipeline (its micro-batches are 2 per stage)."""
    return [(1, sync, reshard) for sync in ("every", "last") for reshard in ("after-forward", "after-step")]


def table(name: str, cfg: MMDiTConfig, gpu_counts=(8, 64, 512), batch_per_gpu: int = 4,
          resolution: int = 1024, ac: str = "auto", optim: str = "adamw", cp_attention: str = "auto") -> str:
    which = "chosen per layout" if ac == "auto" else ac
    lines = [f"{name}: {count_params(cfg) / 1e9:.2f} B parameters, {resolution} px, global batch "
             f"{batch_per_gpu} x GPUs, activation checkpointing {which}" + (", Muon" if optim == "muon" else ""), "",
             "| GPUs | layout | memory GiB/GPU | NVLink GiB/GPU/step | inter-node GiB/GPU/step | "
             "modelled step s | images/s/GPU |", "|---|---|---|---|---|---|---|"]
    for g in gpu_counts:
        best, _ = recommend(cfg, g, g * batch_per_gpu, resolution=resolution, ac=ac, optim=optim,
                            cp_attention=cp_attention)
        lines.append(best.row(g) if best else f"| {g} | nothing fits in 80 GiB | | | | | |")
    return "\n".join(lines)
