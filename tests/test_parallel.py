"""Parallel layouts on CPU with gloo: each must train exactly like one process.

One single-process reference run (4 steps, checkpoints at 3 and 4); each layout runs 3 steps
under torchrun. The layouts' losses must equal the reference's (fp32, <= 1e-5 relative) and
their weights after 3 steps must match (<= 1e-4 relative per tensor). Reshard: a tp=2 checkpoint
resumes at dp_shard=2, a pp=2 checkpoint in one process; both continue to step 4 exactly like
the reference did.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from multiproc import torchrun

from kiln.engine.errors import ConfigError
from kiln.engine.metrics import read_metrics
from kiln.engine.recipes import recipe
from kiln.engine.train import train

COMMON = ["train.batch_size=8", "train.log_every=1", "train.ckpt_every=3", "train.keep_ckpts=2",
          "train.threads=1", "sample.num_prompts=0", "parallel.timeout_s=300"]

LAYOUTS = {  # the five layouts; AC modes, async checkpoints, HSDP, the sharded text encoder
    # and the other schedules ride along
    "tp2": (2, ["parallel.tp=2", "parallel.activation_checkpoint=selective"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.microbatches=2"]),
    "dp_shard2": (2, ["parallel.dp_shard=2", "parallel.activation_checkpoint=full", "parallel.async_checkpoint=true"]),
    "dp_shard2_accumulate2": (2, ["parallel.dp_shard=2", "parallel.microbatches=2", "parallel.accumulate_sync=last"]),
    "dp_shard2_tp2": (4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.reshard=after-step"]),
    "pp2_dp_shard2": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=gpipe",
                          "parallel.microbatches=2"]),
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.shard_text_encoder=true",
                    "sample.num_prompts=2", "sample.steps=1"]),  # eval with a sharded encoder
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b", "parallel.virtual_stages=2",
                            "parallel.microbatches=2"]),
    # context parallel (Ulysses): alone (its all-to-alls rerun by full checkpointing), under
    # FSDP over dp_shard x cp, and inside tensor parallel's head split
    "cp2": (2, ["parallel.cp=2", "parallel.dp_shard=1", "parallel.activation_checkpoint=full"]),
    "dp_shard2_cp2": (4, ["parallel.dp_shard=2", "parallel.cp=2", "parallel.microbatches=2"]),
    "tp2_cp2": (4, ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1", "parallel.activation_checkpoint=full"]),
    # ring attention instead of the all-to-alls: its forward run again by full checkpointing;
    # under TP's head split, where 2 heads a rank would let Ulysses' cp be at most 2
    "cp2_ring": (2, ["parallel.cp=2", "parallel.cp_attention=ring", "parallel.dp_shard=1",
                     "parallel.activation_checkpoint=full"]),
    "tp2_cp2_ring": (4, ["parallel.tp=2", "parallel.cp=2", "parallel.cp_attention=ring", "parallel.dp_shard=1"]),
    # ... between pipeline stages (each stage's ring over its own cp group), and compiled
    "pp2_cp2_ring": (4, ["parallel.pp=2", "parallel.cp=2", "parallel.cp_attention=ring", "parallel.dp_shard=1",
                         "parallel.pp_schedule=1f1b", "parallel.microbatches=2"]),
    "cp2_ring_compiled": (2, ["parallel.cp=2", "parallel.cp_attention=ring", "parallel.dp_shard=1",
                              "parallel.compile=true"]),
    # torch.compile (inductor) of checkpointed blocks whose all-to-alls the recompute runs again
    "cp2_compiled": (2, ["parallel.cp=2", "parallel.dp_shard=1", "parallel.activation_checkpoint=full",
                         "parallel.compile=true"]),
}


def _config(steps: int, sets: list[str]):
    from kiln.engine.config import apply_override

    cfg = recipe("tiny")
    cfg.train.steps = steps
    for s in COMMON + sets:
        apply_override(cfg, s)
    return cfg


def _torchrun(nproc: int, out: Path, args: list[str], entry: tuple[str, ...] = ("-m", "kiln.engine.train")) -> None:
    torchrun(nproc, [*entry, *args], out=out)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _heldout(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["heldout_loss"] for r in rows if "heldout_loss" in r)


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Model and EMA weights of a checkpoint of either kind, unsharded."""
    path = run / "checkpoints" / f"step_{step:08d}"
    if path.with_suffix(".pt").is_file():
        state = torch.load(path.with_suffix(".pt"), weights_only=True)
        return {**{f"model.{k}": v for k, v in state["model"].items()},
                **{f"ema.{k}": v for k, v in state["ema"]["params"].items()}}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    want = {k: torch.empty(m.size) for k, m in meta.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and k.startswith(("model.", "ema."))}
    dcp.load(want, checkpoint_id=str(path))
    return want


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)
    assert worst <= 1e-4, f"weights differ by {worst:.2e} (relative)"


def _assert_same_losses(got: dict, want: dict, steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), f"step {s}: {got[s]} vs {want[s]}"


def _single_process(out: Path, steps: int, sets: list[str]) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker
    try:
        train(_config(steps, sets), out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return _single_process(tmp_path_factory.mktemp("parallel") / "single", 4, [])


@pytest.fixture(scope="module")
def layout_runs(reference) -> dict[str, Path]:
    runs = {}
    for name, (nproc, sets) in LAYOUTS.items():
        out = reference.parent / name
        _torchrun(nproc, out, ["--out", str(out), "--steps", "3", *[a for s in COMMON + sets for a in ("--set", s)]])
        runs[name] = out
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, layout_runs):
    run = layout_runs[layout]
    _assert_same_losses(_losses(run), _losses(reference), (1, 2, 3))
    _assert_same_weights(_weights(run, 3), _weights(reference, 3))
    assert (run / "summary.json").is_file() and not list(run.glob("checkpoints/*.tmp"))


@pytest.mark.parametrize("layout, init", [("tp2", 2.0**22), ("pp2_dp_shard2", 2.0**24)])
def test_fp16_layouts_skip_the_steps_one_process_skips(layout, init, tmp_path):
    """fp16 loss scaling over ranks: the overflow test is the global gradient norm, so all ranks
    skip together. tp2 from 2^22 (two overflowing steps, then a clean one) equals one process;
    pp2 x dp_shard2 from 2^24 overflows on every step, through the pipeline's scaled loss: no
    stage or shard may change a weight."""
    sets = ["train.precision=fp16-autocast", f"train.loss_scale_init={init}"]
    single = _single_process(tmp_path / "single", 3, sets)
    run = tmp_path / layout
    nproc, layout_sets = LAYOUTS[layout]
    _torchrun(nproc, run, ["--out", str(run), "--steps", "3", *[a for s in COMMON + layout_sets + sets
                                                                 for a in ("--set", s)]])
    scales = [r["loss_scale"] for r in read_metrics(run) if "loss" in r]
    assert scales == [r["loss_scale"] for r in read_metrics(single) if "loss" in r]
    assert scales == [init, init / 2, init / 4]
    _assert_same_losses(_losses(run), _losses(single), (1, 2, 3))
    got, want = _weights(run, 3), _weights(single, 3)
    _assert_same_weights(got, want)
    skipped = json.loads((run / "summary.json").read_text())["loss_scale"]["skipped"]
    assert skipped == json.loads((single / "summary.json").read_text())["loss_scale"]["skipped"]
    if skipped == 3:
        assert all(torch.equal(got[k], want[k]) for k in want)  # the initial weights, bit for bit


@pytest.mark.parametrize("sync, reshard, shard", [("every", "after-step", "dp_shard"), ("last", "after-forward", "cp")])
def test_gradient_accumulation_reduces_gradients_as_asked(sync, reshard, shard, reference, tmp_path):
    """HSDP 2 x 2 with 2 accumulated micro-batches (of 1 image): FSDP reduce-scatters each group's gradients
    after each micro-batch (accumulate_sync=every) or once (=last); the all-reduce across
    replicas runs once per step either way. Parameters are gathered once per step
    (reshard=after-step) or for each block's forward and backward in each micro-batch, the
    root's once per micro-batch (after-forward). The shards are dp_shard=2, or cp=2: context
    parallel's ranks share the weights, FSDP shards them over both, and every block all-to-alls
    q, k, v and the attention output, forward and backward. All train like one process."""
    steps, k, cfg = 3, 2, _config(3, [])
    blocks = cfg.model.depth + cfg.model.single_depth  # fully_shard per block, and the root
    sets = [*COMMON, "parallel.dp_replicate=2", f"parallel.{shard}=2", f"parallel.microbatches={k}",
            f"parallel.accumulate_sync={sync}", f"parallel.reshard={reshard}"]
    sets += ["parallel.dp_shard=1"] if shard == "cp" else []
    run = tmp_path / sync
    _torchrun(4, run, ["--out", str(run), "--steps", str(steps), *[a for s in sets for a in ("--set", s)]],
              entry=(str(Path(__file__).with_name("count_collectives.py")),))
    counts = [(run / f"collectives_rank{r}.txt").read_text().strip() for r in range(4)]
    gathers = steps * (blocks + 1 if reshard == "after-step" else k * (2 * blocks + 1))
    scatters = steps * (blocks + 1) * (k if sync == "every" else 1)
    all_reduces = steps * (blocks + 1)
    all_to_alls = steps * k * blocks * 4 if shard == "cp" else 0
    assert counts == [f"rank {r} all-gathers {gathers} reduce-scatters {scatters} all-reduces {all_reduces} "
                      f"all-to-alls {all_to_alls} dtensor all-gathers 0 dtensor reduce-scatters 0 "
                      "dtensor all-reduces 0 ring bytes 0" for r in range(4)]
    _assert_same_losses(_losses(run), _losses(reference), (1, 2, 3))
    _assert_same_weights(_weights(run, 3), _weights(reference, 3))


def _counts(run: Path, rank: int = 0) -> dict[str, int]:
    words = (run / f"collectives_rank{rank}.txt").read_text().split()[2:]  # "rank R name N name N ..."
    counts, name = {}, []
    for w in words:
        if w.isdigit():
            counts[" ".join(name)], name = int(w), []
        else:
            name.append(w)
    return counts


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory) -> tuple[Path, list[str]]:
    """A prepared synthetic dataset (varied aspect ratios, tiny recipe: 4 px per token) and its
    single-process reference run; some of its 4 batches have an odd image-token count."""
    from kiln.engine.data.mix import MixLoader
    from kiln.engine.data.prepare import prepare

    root = tmp_path_factory.mktemp("bucketed")
    prepare("synthetic:96", root / "ds", shard_size=48, workers=1, progress=False)
    # and an evaluation at the end: rank 0 gathers the weights from every stage's first rank
    sets = ["data.source=shards", f"data.path={root / 'ds'}", "sample.num_prompts=2", "sample.steps=1"]
    cfg = _config(4, sets)
    loader = MixLoader(cfg.data, [cfg.data.path], [], cfg.train.batch_size, multiple=cfg.model.patch_size)
    shapes = [loader.next_shape() for _ in range(4)]
    assert any((h // 4) * (w // 4) % 2 for h, w in shapes), shapes  # pads get exercised
    return _single_process(root / "single", 4, sets), sets


@pytest.mark.parametrize("name, nproc, sets", [
    ("tp2", 2, ["parallel.tp=2"]),
    ("cp2", 2, ["parallel.cp=2", "parallel.dp_shard=1"]),
    ("tp2_cp2", 4, ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1"]),
    ("pp2_tp2", 4, ["parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"]),
    # a later stage receives its cp peer's padded tokens; the last weights its pads 0
    ("pp2_cp2", 4, ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1", "parallel.microbatches=2"]),
    # compiled tensor parallel: DTensor needs static shapes, one graph per bucket (it failed at the
    # second bucket with dynamic shapes)
    ("tp2_compiled", 2, ["parallel.tp=2", "parallel.compile=true"]),
])
def test_odd_buckets_are_padded_and_train_like_one_process(name, nproc, sets, bucketed, tmp_path):
    """Aspect-ratio buckets whose image tokens do not split over cp x tp (9 x 7 = 63): padded
    inside the blocks, masked as keys, dropped or weighted 0 in the loss; the same buckets,
    losses and weights as one process. A pipeline gets a schedule per batch shape (its stages
    learn their activation shapes on their first step), whose receive buffers are freed between
    its steps."""
    reference, data = bucketed
    run = tmp_path / name
    pipelined = name.startswith("pp")
    entry = (str(Path(__file__).with_name("pipeline_memory.py")),) if pipelined else ("-m", "kiln.engine.train")
    _torchrun(nproc, run, ["--out", str(run), "--steps", "4", *[a for s in COMMON + data + sets
                                                                 for a in ("--set", s)]], entry=entry)
    _assert_same_losses(_losses(run), _losses(reference), (1, 2, 3, 4))
    _assert_same_weights(_weights(run, 3), _weights(reference, 3))
    assert _heldout(run) == pytest.approx(_heldout(reference), rel=1e-4)
    if pipelined:  # receive buffers are held by the running schedule only (they were kept by every
        for rank in range(nproc):  # schedule built, one per batch shape seen)
            held = dict(x.split("=") for x in (run / f"pipeline_rank{rank}.txt").read_text().split())
            assert int(held["schedules"]) >= 3 and int(held["during"]) > 0 and int(held["between"]) == 0, held


def test_no_process_group_outlives_shutdown(tmp_path):
    """A group left alive keeps its gloo threads past the interpreter's end, where a rank can die
    by SIGABRT after its work is done (parallel.release_process_groups)."""
    torchrun(2, [str(Path(__file__).with_name("teardown_ranks.py")), str(tmp_path)], timeout=300, out=tmp_path)
    for r in range(2):
        threads = json.loads((tmp_path / f"threads_rank{r}.json").read_text())
        assert "pt_gloo_runloop" in threads["running"], threads  # the names this check looks for
        assert not [t for t in threads["after"] if "gloo" in t], f"rank {r}: {threads['after']}"


def test_pipeline_stages_reduce_and_reshard_like_gradient_accumulation(reference, tmp_path):
    """pp=2 x dp_shard=2, 2 micro-batches: accumulate_sync=every reduce-scatters each
    micro-batch's gradients, holding none unsharded (torch's stages alone hold them all until the
    last, as accumulate_sync=last does: 4 bytes per parameter of the stage), reshard=after-forward
    gathers the parameters again for each forward and backward; all three train like one process."""
    steps, counts, held = 3, {}, {}
    for sync, reshard in (("last", "after-step"), ("every", "after-step"), ("every", "after-forward")):
        run = tmp_path / f"{sync}_{reshard}"
        sets = [*COMMON, "parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=1f1b",
                "parallel.microbatches=2", f"parallel.accumulate_sync={sync}", f"parallel.reshard={reshard}"]
        _torchrun(4, run, ["--out", str(run), "--steps", str(steps), *[a for s in sets for a in ("--set", s)]],
                  entry=(str(Path(__file__).with_name("pipeline_memory.py")),))
        counts[sync, reshard] = [_counts(run, rank) for rank in range(4)]
        held[sync, reshard] = [dict(x.split("=") for x in (run / f"pipeline_rank{r}.txt").read_text().split())
                               for r in range(4)]
        _assert_same_losses(_losses(run), _losses(reference), (1, 2, 3))
    for rank in range(4):
        last, every, forward = (c[rank] for c in counts.values())
        assert last["reduce-scatters"] > 0 and every["reduce-scatters"] == 2 * last["reduce-scatters"], (last, every)
        assert every["all-gathers"] == last["all-gathers"] < forward["all-gathers"], (every, forward)
        assert forward["reduce-scatters"] == every["reduce-scatters"]
        last, every, forward = (h[rank] for h in held.values())
        assert int(last["grads"]) == int(last["all_grads"]) > 0, last
        assert int(every["grads"]) == int(forward["grads"]) == 0, (every, forward)


def test_checkpointing_sends_only_what_it_did_not_keep(reference, tmp_path):
    """tp=2 x cp=2 without, with selective and with full checkpointing, counting what is sent.
    Without checkpointing every block keeps its column-parallel inputs as this rank's rows and
    gathers them again in the backward (sequence_parallel.Regather): exactly the all-gathers
    full checkpointing's recompute runs, but for the modulations' (one a stream; their outputs
    are kept). Full reruns the all-to-alls and the reduce-scatters too (x1.5). Selective
    checkpoints no block under tp (its policy keeps the row-parallel matmuls' partial sums
    whole: kiln.engine.scaling.checkpointed) and sends what none sends. Gradient reductions
    are never repeated; all three train like one process."""
    steps, cfg = 3, _config(3, [])
    blocks, double = cfg.model.depth + cfg.model.single_depth, cfg.model.depth
    assert 0 < double < blocks
    counts = {}
    for ac in ("none", "selective", "full"):
        run = tmp_path / ac
        sets = [*COMMON, "parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1",
                f"parallel.activation_checkpoint={ac}"]
        _torchrun(4, run, ["--out", str(run), "--steps", str(steps), *[a for s in sets for a in ("--set", s)]],
                  entry=(str(Path(__file__).with_name("count_collectives.py")),))
        counts[ac] = _counts(run)
        _assert_same_losses(_losses(run), _losses(reference), (1, 2, 3))
    none, sel, full = counts["none"], counts["selective"], counts["full"]
    assert sel == none, (sel, none)
    assert none["all-to-alls"] == steps * blocks * 4
    assert full["all-to-alls"] == steps * blocks * 6
    # the row-parallel outputs: 4 a double-stream block (projection and MLP-out a stream), 2 a single-stream one
    rs = "dtensor reduce-scatters"
    assert full[rs] - none[rs] == steps * (4 * double + 2 * (blocks - double))
    # 102 until Dec 8, when the blocks kept their gathered inputs whole; 4 a double-stream block
    # (QKV and MLP-in of each stream), 1 a single-stream one (QKV and MLP-in share it)
    assert none["dtensor all-gathers"] == 102 + steps * (4 * double + (blocks - double)), none
    assert full["dtensor all-gathers"] - none["dtensor all-gathers"] == steps * (2 * double + (blocks - double))
    for kind in ("dtensor all-reduces", "all-gathers", "reduce-scatters"):
        assert none[kind] == full[kind], (kind, none, full)


def test_ring_sends_again_only_under_full_checkpointing(reference, tmp_path):
    """cp=2 by ring attention, counting the bytes its transfers carry (count_collectives wraps
    ring_attention._rotate). Selective keeps the ring op's output, so its recompute sends
    nothing (the scaling model's RING_FORWARDS: 1); full reruns each block's forward ring (2):
    in the ratio ring_bytes gives a step of each (fp32 on the CPU: every tensor sent 4 bytes).
    All three train like one process."""
    from kiln.engine.scaling import ring_bytes

    sent = {}
    for ac in ("none", "selective", "full"):
        run = tmp_path / ac
        sets = [*COMMON, "parallel.cp=2", "parallel.cp_attention=ring", "parallel.dp_shard=1",
                f"parallel.activation_checkpoint={ac}"]
        _torchrun(2, run, ["--out", str(run), "--steps", "3", *[a for s in sets for a in ("--set", s)]],
                  entry=(str(Path(__file__).with_name("count_collectives.py")),))
        sent[ac] = _counts(run)["ring bytes"]
        _assert_same_losses(_losses(run), _losses(reference), (1, 2, 3))
    assert sent["none"] > 0 and sent["selective"] == sent["none"]
    D = _config(3, []).model.head_dim
    ratio = ring_bytes(1, 2, "full", act=4, head_dim=D) / ring_bytes(1, 2, "none", act=4, head_dim=D)
    assert sent["full"] == pytest.approx(sent["none"] * ratio, rel=1e-12), sent


def test_tp_checkpoint_resumes_at_dp_shard(reference, layout_runs, tmp_path):
    run = tmp_path / "tp2_then_dp2"
    shutil.copytree(layout_runs["tp2"], run)
    _torchrun(2, run, ["--resume", str(run), "--steps", "4", "--set", "parallel.tp=1", "--set", "parallel.dp_shard=2"])
    _assert_same_losses(_losses(run), _losses(reference), (4,))
    _assert_same_weights(_weights(run, 4), _weights(reference, 4))


@pytest.mark.parametrize("nproc, sets", [(4, ["parallel.dp_shard=2", "parallel.tp=2"]),
                                         (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"])])
def test_single_process_checkpoint_resumes_in_a_layout(nproc, sets, reference, tmp_path):
    """A run prototyped in one process goes on under FSDP x TP or a pipeline: every rank reads
    the step_*.pt file and keeps its shards of the weights, EMA and AdamW moments (keyed by
    parameter name from the one process's order); step 4 is the uninterrupted run's."""
    run = tmp_path / "single_then_layout"
    shutil.copytree(reference, run)
    (run / "checkpoints" / "step_00000004.pt").unlink()
    (run / "checkpoints" / "latest").write_text("step_00000003.pt\n")
    _torchrun(nproc, run, ["--resume", str(run), "--steps", "4", *[a for s in sets for a in ("--set", s)]])
    _assert_same_losses(_losses(run), _losses(reference), (4,))
    _assert_same_weights(_weights(run, 4), _weights(reference, 4))


MUON = ["optim.name=muon", "optim.warmup_steps=0", "optim.lr=1e-3"]  # updates that move the loss in 4 steps


@pytest.fixture(scope="module")
def muon_reference(reference) -> Path:
    return _single_process(reference.parent / "muon_single", 4, MUON)


def _momentum(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Muon's momentum buffers by parameter name, from a checkpoint of either kind."""
    from kiln.engine.optim import single_process_order

    path = run / "checkpoints" / f"step_{step:08d}"
    if path.with_suffix(".pt").is_file():
        names = single_process_order(_config(step, MUON))[1]
        state = torch.load(path.with_suffix(".pt"), weights_only=True)["optimizer"]["optimizers"][1]["state"]
        return {names[i]: s["momentum_buffer"] for i, s in state.items()}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata()
    want = {k: torch.empty(m.size) for k, m in meta.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata) and k.endswith(".momentum_buffer")}
    dcp.load(want, checkpoint_id=str(path))
    return {k.removeprefix("optimizer.state.").removesuffix(".momentum_buffer"): v for k, v in want.items()}


@pytest.mark.parametrize("name, nproc, sets", [
    ("dp_shard2_tp2", 4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    ("pp2_resumed", 2, ["parallel.pp=2", "parallel.microbatches=2"]),
])
def test_muon_trains_in_a_layout_like_one_process(name, nproc, sets, muon_reference, tmp_path):
    """Muon's Newton-Schulz needs whole matrices; engine/muon.py hands each to one rank of its
    shard group. Under FSDP x TP from the start, and in a pipeline resumed from one process's
    step-3 checkpoint (its AdamW and Muon state renamed from the one process's parameter order),
    the losses are one process's and so are the momentum buffers, to 1e-2 (a lost momentum would
    be ~90% off). Not to 1e-4 like AdamW's: Newton-Schulz runs in bf16 (as torch's), where
    last-bit differences of the gradient reductions flip roundings (the low-rank first updates
    of the zero-initialised modulation weights end up to 10% apart; 0.2% in the momenta).
    tests/muon_layouts.py checks the sharded update itself bit for bit."""
    run = tmp_path / name
    args = ["--out", str(run)]
    if name.endswith("resumed"):
        shutil.copytree(muon_reference, run)
        (run / "checkpoints" / "step_00000004.pt").unlink()
        (run / "checkpoints" / "latest").write_text("step_00000003.pt\n")
        args = ["--resume", str(run)]
    _torchrun(nproc, run, [*args, "--steps", "4", *[a for s in COMMON + MUON + sets for a in ("--set", s)]])
    _assert_same_losses(_losses(run), _losses(muon_reference), (4,) if name.endswith("resumed") else (1, 2, 3, 4))
    got, want = _momentum(run, 4), _momentum(muon_reference, 4)
    assert got.keys() == want.keys() and len(want) == 30
    worst = max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)
    assert worst <= 1e-2, f"momentum differs by {worst:.2e}"


def test_pp_checkpoint_resumes_in_one_process(reference, layout_runs, tmp_path):
    from kiln.engine.train import load_run_config

    run = tmp_path / "pp2_then_single"
    shutil.copytree(layout_runs["pp2_1f1b"], run)
    cfg = load_run_config(run)
    cfg.train.steps, cfg.parallel.pp = 4, 1
    train(cfg, run, resume=True)
    _assert_same_losses(_losses(run), _losses(reference), (4,))
    _assert_same_weights(_weights(run, 4), _weights(reference, 4))


@pytest.mark.parametrize("layout", ["dp_shard2_tp2", "pp2_interleaved"])
def test_sample_reads_a_layouts_checkpoint_in_one_process(layout, reference, layout_runs):
    """kiln sample on a distributed checkpoint (FSDP x TP DTensors; pipeline stages of 2 virtual
    stages each): the chosen weights reassembled in one process sample what the reference's do."""
    from kiln.engine.generate import SampleRequest, sample_images

    ref = str(reference / "checkpoints" / "step_00000003.pt")
    for use_ema in (True, False):
        got, made = sample_images(layout_runs[layout], SampleRequest(["a red circle"], steps=2, use_ema=use_ema))
        want, _ = sample_images(reference, SampleRequest(["a red circle"], steps=2, use_ema=use_ema, checkpoint=ref))
        assert made["step"] == 3 and made["checkpoint"].endswith("step_00000003")
        assert np.abs(got.astype(int) - want).max() <= 1  # weights equal to 1e-4 (test above)


@pytest.mark.parametrize("ac", ["selective", "full"])
def test_checkpointed_blocks_compile(ac):
    """torch.compile must trace a checkpointed block (a functools.partial of checkpoint as the
    block's forward made dynamo skip it: parallel.compile=true ran eagerly, silently); the
    compiled block gives the eager block's output and gradients."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from kiln.engine.parallel import checkpoint_block
    from kiln.model import MMDiT

    cfg = _config(1, [])
    torch.manual_seed(0)
    eager = MMDiT(cfg.model)
    torch.nn.init.normal_(eager.single_blocks["0"].mod.weight, std=0.02)  # adaLN-Zero: not the identity
    compiled = copy.deepcopy(eager)
    checkpoint_block(compiled.single_blocks["0"], ac)  # apply_ac's selective leaves it alone at tp=1
    block, ref = compiled.single_blocks["0"], eager.single_blocks["0"]
    torch._dynamo.reset()
    counters.clear()
    block.compile(backend="aot_eager")  # the graph and its partition, without inductor's C++ build
    W, D = cfg.model.width, cfg.model.head_dim
    x = torch.randn(2, 12, W, requires_grad=True)
    c, rope = torch.randn(2, W), (torch.ones(12, D), torch.zeros(12, D))
    group, mask = torch.ones(12, dtype=torch.long), torch.ones(2, 12, dtype=torch.bool)
    outs, grads = [], []
    for b in (block, ref):
        outs.append(b(x, c, rope, group, mask))
        grads.append(torch.autograd.grad(outs[-1].square().sum(), [x, *b.parameters()]))
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    twin = copy.deepcopy(compiled).single_blocks["0"]
    assert twin.forward.forward.__self__ is twin  # a copy runs its own weights
    torch.testing.assert_close(outs[0], outs[1])
    for g, h in zip(*grads, strict=True):
        torch.testing.assert_close(g, h)


def test_layout_errors_name_the_field():
    from kiln.engine.parallel import check_layout

    cfg = _config(3, [])
    with pytest.raises(ConfigError, match="parallel: dp_replicate x dp_shard x cp x tp x pp = 6"):
        cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp_shard = 3, 2, 1
        cfg.parallel.sizes(4)
    cfg = _config(3, [])
    with pytest.raises(ConfigError, match="parallel.tp=3 must divide model.heads = 4"):
        check_layout(cfg, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 3})
    with pytest.raises(ConfigError, match="train.batch_size = 8 must be divisible by the 3 data-parallel ranks"):
        check_layout(cfg, {"pp": 1, "dp_replicate": 1, "dp_shard": 3, "tp": 1})
    cfg.parallel.microbatches = 3  # gradient accumulation (no pipeline) splits the rank's batch too
    with pytest.raises(ConfigError, match="parallel.microbatches = 3 must divide the per-rank batch 4"):
        check_layout(cfg, {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 1})
    assert cfg.parallel.sizes(8) == {"dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 1, "pp": 1}
    one, cfg.parallel.microbatches = {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}, 0
    with pytest.raises(ConfigError, match=r"parallel.cp=4 must divide the heads each tensor-parallel rank holds "
                                          r"\(model.heads / parallel.tp = 2\)"):
        check_layout(cfg, {**one, "tp": 2, "cp": 4})
    cfg.parallel.cp_attention = "ring"  # keeps every head a rank has: any cp
    check_layout(cfg, {**one, "tp": 2, "cp": 4})
    cfg.text.max_length = 6
    with pytest.raises(ConfigError, match="parallel.cp x parallel.tp = 4 must divide text.max_length = 6"):
        check_layout(cfg, {**one, "cp": 4})


def test_every_pipeline_carrier_tensor_carries_a_gradient():
    """A stage sends a gradient back for each tensor it received; torch 2.11's PipelineStage
    refuses a None one. So every carrier tensor a stage hands on must require grad, and every
    carrier tensor a stage receives must get a gradient, padding mask included."""
    from kiln.engine.parallel import stage_module
    from kiln.model import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    cfg = MMDiTConfig(width=32, depth=2, single_depth=1, heads=2, patch_size=2, text_dim=12, pooled_dim=8)
    model = MMDiT(cfg)
    first, middle, last = (stage_module(model, i, 3) for i in range(3))
    B, L, H = 2, 5, 8
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    inputs = (torch.randn(B, cfg.in_channels, H, H), torch.rand(B), torch.randn(B, L, 12), mask, torch.randn(B, 8),
              torch.tensor([[H, H, 0, 0, H, H]] * B, dtype=torch.float32))
    sent = first(*inputs)
    middle.grid = last.grid = first.grid  # the trainer sets it on every stage
    assert all(t.requires_grad for t in sent), [t.requires_grad for t in sent]
    received = [t.detach().requires_grad_() for t in sent]
    handed_on = middle(*received)
    assert all(t.requires_grad for t in handed_on)
    out = last(*[t.detach().requires_grad_() for t in handed_on])
    torch.autograd.backward(handed_on, [torch.randn_like(t) for t in handed_on])
    assert all(t.grad is not None for t in received), [t.grad is None for t in received]
    # the stages together are the model: same output as the unsplit module
    torch.testing.assert_close(out, model(*inputs), rtol=1e-5, atol=1e-6)


def test_scaling_model_layouts_multiply_to_the_gpu_count_and_shard_memory():
    from kiln.engine.scaling import estimate, recommend
    from kiln.model.presets import preset

    cfg = preset("base")
    single = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1}
    fsdp8 = {**single, "dp_shard": 8}
    # same images per GPU: sharding 8 ways cuts the 20 bytes/param of master state 8-fold
    assert estimate(cfg, fsdp8, 4).memory_gib < estimate(cfg, single, 4).memory_gib - 15
    assert estimate(cfg, single, 4).inter_gib == 0 and estimate(cfg, single, 4).intra_gib == 0
    best, fits = recommend(cfg, 64, 256)
    assert best is not None and all(e.memory_gib <= 72 for e in fits)
    lay = best.layout
    assert lay["dp_replicate"] * lay["dp_shard"] * lay["cp"] * lay["tp"] * lay["pp"] == 64
    # 2048 px without checkpointing: 4 images of activations per GPU are 100s of GiB; only
    # gradient accumulation (no pipeline) fits, at the price of an all-gather per micro-batch
    best, fits = recommend(preset("xl"), 8, 32, resolution=2048, ac="none")
    assert best is not None and all(e.accumulate > 1 for e in fits) and best.memory_gib <= 72
    whole = estimate(preset("xl"), best.layout, 32 // (best.layout["dp_shard"] * best.layout["dp_replicate"]),
                     2048, ac="none")
    assert whole.memory_gib > 80 and whole.intra_gib < best.intra_gib
    assert f"microbatches={best.accumulate}" in best.row(8)
    # 4096 px: one image's activations do not fit a GPU; context parallel splits its tokens
    best, _ = recommend(preset("xl"), 8, 8, resolution=4096)
    assert best is not None and best.layout["cp"] > 1 and f"cp={best.layout['cp']}" in best.row(8)
    alone = estimate(preset("xl"), {**best.layout, "cp": 1}, best.images // best.layout["dp_shard"], 4096,
                     accumulate=best.accumulate)
    assert alone.memory_gib > 80 > best.memory_gib
    # cp under a pipeline: each stage's cp rank holds its tokens of its blocks, and sends them on
    from kiln.engine.scaling import layouts

    assert {"dp_replicate": 1, "dp_shard": 1, "cp": 4, "tp": 1, "pp": 2} in list(layouts(8, preset("xl").heads))
    one_cp = {"dp_replicate": 1, "dp_shard": 1, "tp": 1}
    staged, flat = (estimate(preset("xl"), {**one_cp, "cp": 4, "pp": pp}, 8, 4096, ac="none") for pp in (2, 1))
    assert 0 < staged.intra_gib < flat.intra_gib and staged.memory_gib < flat.memory_gib


def test_scaling_model_counts_the_parameters_and_gradients_fsdp_keeps():
    from kiln.engine.scaling import GIB, estimate
    from kiln.model.presets import count_params, preset

    cfg, P = preset("xl"), count_params(preset("xl"))
    blocks = cfg.depth + cfg.single_depth
    shard64 = {"dp_replicate": 1, "dp_shard": 64, "tp": 1, "pp": 1}
    fwd, step = (estimate(cfg, shard64, 4, reshard=r) for r in ("after-forward", "after-step"))
    # kept: the whole model's bf16 parameters instead of two blocks'; gathered once, not twice
    assert step.memory_gib - fwd.memory_gib == pytest.approx((2 * P - 4 * P / blocks) / GIB)
    assert step.inter_gib == pytest.approx(fwd.inter_gib * (2 + 4) / (4 + 4))
    assert step.seconds < fwd.seconds and "reshard=after-step" in step.row(64)
    # a pipeline's stages keep parameters and gradients as asked, over their K = 2·pp micro-batches
    pp2 = {"dp_replicate": 1, "dp_shard": 4, "tp": 1, "pp": 2}
    est = {(sync, r): estimate(cfg, pp2, 4, 2048, sync=sync, reshard=r)
           for sync in ("every", "last") for r in ("after-forward", "after-step")}
    assert estimate(cfg, pp2, 4, 2048) == est["every", "after-step"]  # auto: kept with a pipeline
    held = est["last", "after-step"]  # what torch's stages alone hold: 80.7 GiB
    assert held.memory_gib > (20 * P / 8 + 2 * P / 2 + 4 * P / 2) / GIB  # master state / 8, bf16 / 2, fp32 / 2
    assert held.memory_gib - est["every", "after-step"].memory_gib == pytest.approx(4 * P / 2 / GIB)
    assert est["every", "after-step"].memory_gib - est["every", "after-forward"].memory_gib == pytest.approx(
        (2 * P / 2 - 4 * P / blocks) / GIB)
    f = 3 / 4 * P / 2 / GIB  # FSDP over 4 ranks: (f-1)/f of the stage's P/pp, per byte per parameter
    # held: gathered once, reduced once; every: reduced 4 times; after-forward: gathered 2 x 4 times
    assert est["every", "after-step"].intra_gib - held.intra_gib == pytest.approx(4 * 3 * f)
    assert est["every", "after-forward"].intra_gib - est["every", "after-step"].intra_gib == pytest.approx(
        2 * (2 * 4 - 1) * f)
    assert "microbatches=4 reshard=after-forward" in est["every", "after-forward"].row(8)
    assert "microbatches=4 accumulate_sync=last" in held.row(8)


def test_scaling_model_charges_what_checkpointing_recomputes():
    from kiln.engine.scaling import GIB, estimate, recommend, tokens
    from kiln.model.presets import preset

    cfg = preset("xl")
    shard8 = {"dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 1, "pp": 1}
    none, sel, full = (estimate(cfg, shard8, 4, ac=ac) for ac in ("none", "selective", "full"))
    # compute-bound (FSDP hides under it): full runs a 4th forward; selective checkpoints no
    # block (its policy keeps 22 bytes per token and unit of width, none 20 / 18)
    assert (sel.seconds, sel.memory_gib) == (none.seconds, none.memory_gib)
    assert full.seconds == pytest.approx(none.seconds * 4 / 3) and none.memory_gib > full.memory_gib
    # the forward's collectives run again: full all of them (x1.5; tp=2 alone sends only TP
    # traffic); without checkpointing under tp the all-gathers (x1.25: the blocks keep their
    # gathered inputs as their rows, sequence_parallel.Regather), and selective checkpoints no
    # block there (its policy keeps the row-parallel partial sums whole): none's traffic and memory
    tp2 = {**shard8, "dp_shard": 1, "tp": 2}
    none, sel, full = (estimate(cfg, tp2, 4, ac=ac) for ac in ("none", "selective", "full"))
    assert (sel.intra_gib, sel.memory_gib, sel.seconds) == (none.intra_gib, none.memory_gib, none.seconds)
    assert full.intra_gib == pytest.approx(1.5 / 1.25 * none.intra_gib)
    assert none.memory_gib > full.memory_gib
    cp2 = {**shard8, "dp_shard": 1, "cp": 2}
    none, sel, full = (estimate(cfg, cp2, 4, ac=ac) for ac in ("none", "selective", "full"))
    S, _ = tokens(cfg, 1024, 77)
    double, single, W = cfg.depth, cfg.single_depth, cfg.width
    all_to_alls = 4 * 16 * S * W / 2 * (1 / 2) / GIB  # a block's, 4 images
    assert full.intra_gib - none.intra_gib == pytest.approx(0.5 * (double + single) * all_to_alls)
    # selective checkpoints no block (22 either way in a double-stream block, 22 against 20 in a
    # single-stream one; until Dec 8 it took the double-stream blocks, 22 against 26)
    assert (sel.intra_gib, sel.memory_gib) == (none.intra_gib, none.memory_gib)
    # without checkpointing a block keeps per token (of S/cp) what it keeps without cp and
    # Ulysses' second layout of the attention output (+2); against FSDP over the same 2 ranks,
    # each of which holds all S tokens of its 4 images
    plain = estimate(cfg, {**cp2, "cp": 1, "dp_shard": 2}, 4, ac="none")
    per_image = double * ((S / 2) * 22 - S * 20) + single * ((S / 2) * 20 - S * 18)
    assert none.memory_gib - plain.memory_gib == pytest.approx(4 * W * per_image / GIB)
    # auto: each layout's fastest mode that fits; at 4096 px the all-to-alls' recompute makes
    # checkpointing slower where cp already splits the activations enough
    auto, _ = recommend(cfg, 8, 8, resolution=4096, ac="auto")
    fixed, _ = recommend(cfg, 8, 8, resolution=4096, ac="selective")
    assert auto.seconds <= fixed.seconds and f"activation_checkpoint={auto.ac}" in auto.row(8)


@pytest.mark.parametrize("t, cp, attention", [(1, 1, "ulysses"), (2, 1, "ulysses"), (1, 2, "ulysses"),
                                              (2, 2, "ring")])
def test_activation_bytes_are_what_a_block_keeps(t, cp, attention, tmp_path):
    """The scaling model's activation bytes per token and unit of width (per mode and block
    kind; under tp, what every rank holds whole and the reduce-scatter outputs selective keeps;
    under Ulysses cp, the attention output a block keeps in both layouts without checkpointing;
    under ring cp nothing more) against what one double- and one single-stream block's forward
    leaves for its backward on each rank (tests/block_memory.py, 2 images a micro-batch). Without
    checkpointing they were 50 and 36 until the adaLN modulation stopped keeping fp32 copies
    (38, 30), the MLP's output layer its GELU's output (30, 22) and the double-stream block's
    projections copies of their attention output's slices (28, 22; at tp=2 17.3 -> 16.3) and
    the gated residuals their branches (24, 20: layers.gated_residual) and the column-parallel
    matmuls the modulated inputs (20, 18: RemadeInputLinears), both not under tp.
    Selective checkpoints a kind of block only where its policy (measured forced on both kinds)
    keeps less than no checkpointing, and so never keeps more: until Dec 7 single-stream blocks
    under tp=2 kept 15.1 with it against 12.2 without."""
    from kiln.engine.scaling import act_bytes, checkpointed, kept_bytes

    sets = [f"parallel.tp={t}", f"parallel.cp={cp}", f"parallel.cp_attention={attention}", "parallel.dp_shard=1",
            "parallel.timeout_s=300"]
    _torchrun(t * cp, tmp_path, [str(tmp_path), *sets], entry=(str(Path(__file__).with_name("block_memory.py")),))
    ring = attention == "ring"
    for rank in range(t * cp):
        measured = json.loads((tmp_path / f"block_memory_rank{rank}.json").read_text())
        for key, value in measured.items():
            ac, kind = key.split()
            single = kind == "single"
            # fp32 statistics per token and head add up to ~0.55 at this width (~0 at xl's)
            want = (kept_bytes("selective", t, cp, single, ring) if ac == "policy"
                    else act_bytes(ac, t, cp, single, ring))
            assert value == pytest.approx(want, abs=0.75), (key, measured)
        for kind in ("double", "single"):  # selective checkpoints a block only where its policy keeps less
            keeps_less = measured[f"policy {kind}"] < measured[f"none {kind}"] - 0.75
            assert checkpointed("selective", t, cp, kind == "single", ring) == keeps_less, (kind, measured)
            assert measured[f"selective {kind}"] <= measured[f"none {kind}"] + 0.25, (kind, measured)


def test_selective_checkpointing_never_keeps_more_than_none_in_the_scaling_model():
    """In every 8-GPU layout, either cp attention: selective checkpoints no block, and so keeps,
    sends and takes what none does. Its policy keeps 22 bytes per token and unit of width a
    block; without checkpointing a block keeps 20 / 18 without tp (the gated residuals keep no
    branch, the modulated inputs are made again: layers.gated_residual, RemadeInputLinears), 22 /
    20 under Ulysses cp, and under tp only its rows of everything (sequence_parallel.Regather),
    while the policy keeps the row-parallel partial sums whole. Until Dec 8 selective took the
    double-stream blocks without tp (22 against 28, then 24). xl, tp=2 x cp=4 ring at 4096 px:
    40.7 GiB either way (until Dec 8 none kept 43.8, gathered inputs whole and copies of the
    attention output, and selective 42.3; until Dec 7 selective 45.2)."""
    from kiln.engine.scaling import CP_ATTENTIONS, act_bytes, checkpointed, estimate, layouts
    from kiln.model.presets import preset

    # decided once, on long sequences: below layers.LEAN_GATE_TOKENS tokens a sample the gated
    # residuals keep their branches (24 / 20) and selective still takes no block
    for ac in ("none", "selective"):
        assert [act_bytes(ac, 1, 1, single, short=True) for single in (False, True)] == [24, 20]
        assert [act_bytes(ac, 1, 1, single) for single in (False, True)] == [20, 18]
    cfg = preset("xl")
    for lay in layouts(8, cfg.heads, CP_ATTENTIONS):
        for attention in CP_ATTENTIONS:
            none, sel = (estimate(cfg, lay, 4, 4096, ac=ac, cp_attention=attention) for ac in ("none", "selective"))
            ring = attention == "ring" and lay["cp"] > 1
            checks = any(checkpointed("selective", lay["tp"], lay["cp"], single, ring) for single in (False, True))
            assert not checks, (lay, attention)
            assert (sel.memory_gib, sel.intra_gib, sel.seconds) == (none.memory_gib, none.intra_gib, none.seconds)
    ring = {"dp_replicate": 1, "dp_shard": 1, "cp": 4, "tp": 2, "pp": 1}
    none, sel = (estimate(cfg, ring, 1, 4096, ac=ac, cp_attention="ring") for ac in ("none", "selective"))
    assert round(sel.memory_gib, 1) == round(none.memory_gib, 1) == 40.7


def test_scaling_model_weighs_ring_attention_against_ulysses():
    """Ring attention in the scaling model: possible wherever tp divides the heads, its traffic
    ring_bytes (checked against what the op sends in ring_attention_ranks.py) hidden behind its
    blocks' attention math where that takes longer (4096 and 1024 px), exposed where not (512 px;
    at 1024 px too until Dec 7, when the backward sent dK, dV rather than dQ)."""
    from kiln.engine.scaling import GIB, GPU_FLOPS, MFU, NVLINK, cp_attentions, estimate, recommend, ring_bytes, tokens
    from kiln.model.presets import preset

    assert cp_attentions({"tp": 2, "cp": 2}, 12) == ["ulysses", "ring"]
    assert cp_attentions({"tp": 4, "cp": 2}, 12) == ["ring"]  # base: 12 heads, 3 a TP rank
    assert cp_attentions({"tp": 4, "cp": 2}, 12, ("ulysses",)) == []
    cfg = preset("xl")
    blocks, W = cfg.depth + cfg.single_depth, cfg.width
    lay = {"dp_replicate": 1, "dp_shard": 2, "cp": 4, "tp": 1, "pp": 1}
    rerun = blocks  # selective checkpoints no block: the all-to-alls run once forward, once backward
    for px, hidden in ((4096, True), (1024, True), (512, False)):  # 1024: 0.29 ms sent a block, 0.32 of math
        S, _ = tokens(cfg, px, 77)
        uly, ring = (estimate(cfg, lay, 4, px, ac="selective", accumulate=4, cp_attention=a)
                     for a in ("ulysses", "ring"))
        sent = 4 * blocks * ring_bytes(S / 4 * W, 4, "selective", head_dim=cfg.head_dim)
        assert ring.intra_gib - uly.intra_gib == pytest.approx((sent - rerun * 4 * 16 * S * W / 4 * 3 / 4) / GIB)
        # under Ulysses every block keeps the attention output's second layout, 2 bytes per token
        # and unit of width (one image a micro-batch)
        second = blocks * 2 * S / 4 * W / GIB
        assert uly.memory_gib - ring.memory_gib == pytest.approx(second)
        bare = uly.seconds - rerun * 4 * 16 * S * W / 4 * 3 / 4 / NVLINK  # without any cp traffic
        attention = 3 * 4 * blocks * 4 * S * S * W / 4 / (GPU_FLOPS * MFU)
        exposed = ring.seconds - bare
        assert exposed == pytest.approx(0 if hidden else sent / NVLINK - attention, abs=1e-9)
        assert "cp_attention=ring" in ring.row(8) and "cp_attention" not in uly.row(8)
    # without checkpointing a block keeps no second layout of its attention output
    uly, ring = (estimate(cfg, lay, 4, 4096, ac="none", accumulate=4, cp_attention=a) for a in ("ulysses", "ring"))
    S, _ = tokens(cfg, 4096, 77)
    assert uly.memory_gib - ring.memory_gib == pytest.approx(blocks * S / 4 * W * 2 / GIB)
    best, _ = recommend(cfg, 8, 8, resolution=4096, ac="auto")
    assert best.cp_attention == "ring" and best.seconds < recommend(cfg, 8, 8, resolution=4096, ac="auto",
                                                                     cp_attention="ulysses")[0].seconds


def test_scaling_model_charges_muon_its_iterations_and_all_to_alls():
    from kiln.engine.scaling import GIB, GPU_FLOPS, MFU, estimate, muon_shapes, recommend
    from kiln.model.presets import preset

    cfg = preset("xl")
    shapes = muon_shapes(cfg)
    p_m = sum(a * b for a, b in shapes)
    # per double block: modulation, QKV, output projection, MLP in and out, per stream; per single block 5
    assert len(shapes) == 10 * cfg.depth + 5 * cfg.single_depth and p_m > 0.99 * 8.3e9
    shard8 = {"dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 1, "pp": 1}
    adamw, muon = (estimate(cfg, shard8, 4, optim=o, shapes=shapes) for o in ("adamw", "muon"))
    assert adamw.memory_gib - muon.memory_gib == pytest.approx(4 * p_m / 8 / GIB)  # one moment, not two
    # Newton-Schulz: 5 x (4 a^2 b + 2 a^3) per matrix, an eighth per rank; two bf16 all-to-alls of the shards
    ns = sum(5 * (4 * min(a, b) ** 2 * max(a, b) + 2 * min(a, b) ** 3) for a, b in shapes) / 8
    sent = 2 * 2 * p_m / 8 * 7 / 8
    assert muon.intra_gib - adamw.intra_gib == pytest.approx(sent / GIB)
    assert muon.seconds - adamw.seconds == pytest.approx(ns / (GPU_FLOPS * MFU) + sent / 450e9, rel=1e-6)
    # HSDP replicas each run their group's share: sharding over every GPU spreads the iterations
    hsdp = estimate(cfg, {**shard8, "dp_replicate": 8}, 4, optim="muon", shapes=shapes)
    flat = estimate(cfg, {**shard8, "dp_shard": 64}, 4, optim="muon", shapes=shapes, reshard="after-step")
    assert hsdp.seconds > flat.seconds
    best, _ = recommend(cfg, 64, 256, optim="muon")
    assert best.optim == "muon" and "optim=muon" in best.row(64) and best.layout["dp_replicate"] == 1


def test_failed_rank_is_named_and_the_run_resumes_from_its_last_checkpoint(reference, tmp_path):
    run = tmp_path / "fail"
    sets = [a for s in COMMON + ["parallel.dp_shard=2"] for a in ("--set", s)]
    proc = torchrun(2, ["-m", "kiln.engine.train", "--out", str(run), "--steps", "4", "--fail-at-step", "4", *sets],
                    check=False)
    assert proc.returncode != 0
    assert "kiln: rank 1 failed at step 4: RuntimeError: simulated failure at step 4" in proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_00000003"]
    _torchrun(2, run, ["--resume", str(run)])
    _assert_same_losses(_losses(run), _losses(reference), (1, 2, 3, 4))
    _assert_same_weights(_weights(run, 4), _weights(reference, 4))
