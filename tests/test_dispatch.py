import contextlib
import subprocess
import sys

import pytest
import torch

from kiln import kernels
from kiln.kernels import dispatch


def test_torch_backend_always_available():
    avail = kernels.available_backends()
    assert avail["torch"] is None
    assert set(avail) == {"torch", "triton", "csrc"}


def test_every_op_has_a_reference_backend():
    ops = kernels.implemented_ops()
    for op in ("rms_norm", "apply_rope", "qk_norm_rope", "qk_norm_attention", "group_norm", "adaln_modulate"):
        assert "torch" in ops[op]


def test_forced_backend_that_cannot_run_lists_reasons():
    dispatch.register("_probe2", "torch", lambda x: x)
    dispatch.register("_probe2", "csrc", lambda x: x, reasons=lambda x: ["needs a GPU", "needs fp16"])
    try:
        with kernels.use_backend("csrc"), pytest.raises(kernels.BackendError) as e:
            dispatch.dispatch("_probe2", torch.randn(2))
        assert "csrc" in str(e.value) and "_probe2" in str(e.value)
    finally:
        dispatch._REGISTRY.pop("_probe2")


def test_ops_a_forced_backend_lacks_take_the_automatic_choice():
    x = torch.randn(2, 4, 8)
    assert "csrc" not in kernels.implemented_ops()["rms_norm"]
    with kernels.use_backend("csrc"):
        torch.testing.assert_close(kernels.rms_norm(x, None), kernels.rms_norm_ref(x, None))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="allowed: triton, csrc, torch"):
        with kernels.use_backend("cuda-magic"):
            pass


def test_use_backend_restores_previous_choice():
    with kernels.use_backend("torch"):
        assert kernels.current_backend() == "torch"
        with kernels.use_backend(None):
            assert kernels.current_backend() is None
        assert kernels.current_backend() == "torch"
    assert kernels.current_backend() is None


def test_auto_selection_skips_refusing_backends():
    calls = []
    dispatch.register("_probe", "torch", lambda x: calls.append("torch") or x)
    dispatch.register("_probe", "csrc", lambda x: calls.append("csrc") or x,
                      reasons=lambda x: ["only even sizes"] if x % 2 else [])
    try:
        dispatch.dispatch("_probe", 3)
        assert calls == ["torch"]
        with kernels.use_backend("csrc"), pytest.raises(kernels.BackendError):
            dispatch.dispatch("_probe", 3)
    finally:
        dispatch._REGISTRY.pop("_probe")


def test_autotune_keeps_the_default_where_it_cannot_time():
    """Off the GPU (interpreter, CI), and with deterministic algorithms, the first candidate runs
    untimed; a remembered choice wins over both."""
    from kiln.kernels import autotune

    a, b = autotune.LaunchConfig(64, 64, 4, 3), autotune.LaunchConfig(128, 64, 8, 3)

    def launch(cfg):
        raise AssertionError("nothing may be timed here")

    assert autotune.tuning_allowed(torch.zeros(1)) == "not a CUDA tensor"
    assert autotune.choose(("k", 1), [a, b], launch, torch.zeros(1)) == a
    assert autotune.uses_default(("k", 1), torch.zeros(1))
    autotune._CHOSEN[("k", 2, "cpu")] = b  # (choose adds the device to the key)
    try:
        assert autotune.choose(("k", 2), [a, b], launch, torch.zeros(1)) == b
        assert not autotune.uses_default(("k", 2), torch.zeros(1))
        with autotune.defaults_only():
            assert autotune.uses_default(("k", 2), torch.zeros(1))
        assert autotune.choices()["k/2/cpu"] == "128x64/w8/s3"
        # a choice is kept per device: another device's tensors do not take it
        meta = torch.zeros(1, device="meta")
        assert autotune.choose(("k", 2), [a, b], launch, meta) == a and autotune.uses_default(("k", 2), meta)
    finally:
        autotune.forget()
    assert autotune.size_class(4096 + 77) == 8192 and autotune.size_class(4096) == 4096
    assert autotune.size_class(1) == 1


def test_triton_ops_run_with_their_tensors_gpu_current(monkeypatch):
    """Triton launches on the current device, not its tensors': every Triton op's body (GroupNorm,
    QK-norm+RoPE, attention; forward and backward) runs inside dispatch.on_device_of(its first
    tensor), which makes a CUDA tensor's device current when another one is (torch.cuda faked:
    no GPU here). Recorded while the ops run under the interpreter."""
    import importlib
    from types import SimpleNamespace

    seen = []

    @contextlib.contextmanager
    def recording(t):
        seen.append(tuple(t.shape))
        yield

    for name in ("group_norm", "qk_norm_rope", "qk_norm_attention"):
        monkeypatch.setattr(importlib.import_module(f"kiln.kernels.{name}"), "on_device_of", recording)
    x = torch.randn(2, 8, 3, 5, requires_grad=True)
    q, k, v = (torch.randn(1, 6, 2, 16, requires_grad=True) for _ in range(3))
    w = torch.ones(16)
    with kernels.use_backend("triton"):
        kernels.group_norm(x, 2).sum().backward()
        sum(o.sum() for o in kernels.qk_norm_rope(q, k, w, w)).backward()
        kernels.qk_norm_attention(q, k, v, w, w).sum().backward()
    assert seen == [(2, 8, 3, 5)] * 2 + [(1, 6, 2, 16)] * 4

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    on_cuda1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    for current in (0, 1):
        monkeypatch.setattr(torch.cuda, "current_device", lambda current=current: current)
        with dispatch.on_device_of(on_cuda1):
            pass
    with dispatch.on_device_of(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]  # only when another GPU was current


def test_autotune_default_is_the_first_candidate_that_fits_the_gpu(monkeypatch):
    """On a GPU with less shared memory a program than the first candidate needs (an A100's 163 KB,
    an L40S's 99 KB), the default is the first candidate whose kernels all fit, found by compiling
    (Triton's warmup, no launch) once per key and limit; none fitting is an error naming the key,
    the limit and each candidate's need. Off CUDA there is no limit. GPU faked: kernels whose
    warmup returns compiled metadata."""
    from types import SimpleNamespace

    from kiln.kernels import autotune

    need = {"big": 180 * 1024, "mid": 110 * 1024, "small": 70 * 1024}
    warmed = []

    class Kernel:
        def __init__(self, name, shared):
            self.name, self.shared = name, shared

        def warmup(self, *args, grid, **kwargs):
            warmed.append(self.name)
            if self.shared is None:
                raise RuntimeError("PassManager::run failed")
            return SimpleNamespace(metadata=SimpleNamespace(shared=self.shared))

        def __getitem__(self, grid):
            raise AssertionError("launched while only compiling")

    def launch(cfg):
        autotune.run_kernel(Kernel("pre", 1024), (1,))  # a small pre-pass: the largest kernel counts
        autotune.run_kernel(Kernel(cfg, need[cfg]), (1,), BLOCK=cfg)

    limit = [163 * 1024]
    monkeypatch.setattr(autotune, "shared_memory_limit", lambda probe: limit[0])
    cands, probe = ["big", "mid", "small"], torch.zeros(1)  # (a CPU probe: untimed, the default)
    try:
        assert autotune.choose(("fit", 1), cands, launch, probe) == "mid"
        assert warmed == ["pre", "big", "pre", "mid"] and autotune._COMPILING.get() is None
        assert autotune.choose(("fit", 1), cands, launch, probe) == "mid" and len(warmed) == 4  # remembered
        limit[0] = 99 * 1024
        assert autotune.choose(("fit", 1), cands, launch, probe) == "small"
        limit[0] = 64 * 1024
        with pytest.raises(RuntimeError, match=r"fit/2/cpu: no launch config fits this GPU's 64 KB of shared memory"
                                               r".*big 180.0 KB, mid 110.0 KB, small 70.0 KB"):
            autotune.choose(("fit", 2), cands, launch, probe)
        limit[0] = 228 * 1024
        assert autotune.choose(("fit", 3), cands, launch, probe) == "big"
        need["big"] = None  # a default that does not compile for this GPU: the next one, with a warning
        with pytest.warns(UserWarning, match="fit/5/cpu: big does not compile for this GPU"):
            assert autotune.choose(("fit", 5), cands, launch, probe) == "mid"
        warmed.clear()
        limit[0] = None  # off CUDA: nothing compiled, the first candidate
        assert autotune.choose(("fit", 4), cands, launch, probe) == "big" and warmed == []
    finally:
        autotune.forget()
    assert autotune.shared_memory_limit(torch.zeros(1)) is None


def test_autotune_drops_a_candidate_that_disagrees_with_the_default(monkeypatch):
    """With ``agree``, a candidate whose result differs from the default's is not timed (and not
    chosen, fast as it may be); one within a few rounding steps is. Timing faked: no GPU here."""
    import triton.testing

    from kiln.kernels import autotune

    ref = torch.linspace(-3, 3, 64)
    results = {"default": (ref,), "close": (ref * 1.003,), "wrong": (ref * 0.5,)}
    speed = {"default": 3.0, "close": 2.0, "wrong": 1.0}
    timed = []

    def bench(fn, warmup, rep):
        fn()
        timed.append(fn.__defaults__[0])
        return speed[fn.__defaults__[0]]

    monkeypatch.setattr(autotune, "tuning_allowed", lambda t: None)
    monkeypatch.setattr(triton.testing, "do_bench", bench)
    monkeypatch.setattr(autotune, "_compile_all", lambda candidates, launch: None)
    try:
        with pytest.warns(UserWarning, match="wrong disagrees with the default"):
            best = autotune.choose(("agree", 1), ["default", "wrong", "close"], results.__getitem__, ref,
                                   agree=autotune.results_agree)
        assert best == "close" and timed == ["default", "close"]
        # every candidate's median is kept for benchmark rows; the dropped one has none
        assert autotune.timings() == {"agree/1/cpu": {"default": 3.0, "wrong": None, "close": 2.0}}
        # without agree the fastest wins, right or wrong (how it was before)
        assert autotune.choose(("agree", 2), ["default", "wrong"], results.__getitem__, ref) == "wrong"
    finally:
        autotune.forget()
    assert autotune.timings() == {}


def test_compiling_in_one_thread_leaves_another_threads_launches_launching():
    """autotune.compile_only holds for its own thread (a context variable): while one thread
    compiles candidates, a kernel another thread runs is launched, not only compiled (a
    process-wide flag skipped it, silently)."""
    import threading

    from kiln.kernels import autotune

    events = []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            events.append("compiled")
            return "compiled kernel"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append("launched")

    inside, done = threading.Event(), threading.Event()

    def other_thread():
        inside.wait(5)
        autotune.run_kernel(Kernel(), (1,))
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with autotune.compile_only() as compiled:
        autotune.run_kernel(Kernel(), (1,))
        inside.set()
        assert done.wait(5)
    thread.join()
    assert events == ["compiled", "launched"] and compiled == ["compiled kernel"]


def test_autotune_compiles_all_candidates_together_before_timing(monkeypatch):
    """Before timing, every candidate's launch runs once in compile-only mode (run_kernel calls
    Triton's warmup) inside Triton's AsyncCompileMode on a thread pool, which joins the compiles
    on exit; a candidate that fails there is left to fail, and drop out, when timed. (The real
    thing, on CUDA: test_gpu_kernels.py.)"""
    import triton

    from kiln.kernels import autotune

    seen = []

    class Mode:  # stands in for triton.AsyncCompileMode
        def __init__(self, pool, ignore_errors):
            seen.append(("mode", pool._max_workers, ignore_errors))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen.append("joined")

    def launch(cfg):
        seen.append((cfg, autotune._COMPILING.get() is not None))
        if cfg == "bad":
            raise RuntimeError("out of resources")

    monkeypatch.setattr(triton, "AsyncCompileMode", Mode, raising=False)
    monkeypatch.setattr(autotune.os, "cpu_count", lambda: 16)
    autotune._compile_all(["a", "bad", "c"], launch)
    assert seen == [("mode", 3, True), ("a", True), ("bad", True), ("c", True), "joined"]
    assert autotune._COMPILING.get() is None
    seen.clear()
    monkeypatch.delattr(triton, "AsyncCompileMode")  # an older Triton: each compiles when first timed
    autotune._compile_all(["a", "c"], launch)
    assert seen == []


# what the training engine needs and a stack embedding only the kernels may lack
ENGINE_ONLY = ("open_clip", "nvidia", "diffusers", "tensorboard", "matplotlib", "PIL", "tqdm", "torchvision",
               "webdataset")


def test_kernels_import_and_run_with_only_torch_and_triton():
    """kiln.kernels is a library other training stacks embed (README, Kernels): importing it and
    running every op must not need the engine's dependencies, nor import kiln.engine or kiln.model."""
    code = "\n".join([
        "import sys",
        f"for name in {ENGINE_ONLY!r}:",
        "    sys.modules[name] = None  # import name -> ImportError",
        "import torch",
        "from kiln import kernels",
        "q, k, v = (torch.randn(2, 9, 2, 32) for _ in range(3))",
        "w = torch.ones(32)",
        "assert kernels.qk_norm_attention(q, k, v, w, w).shape == q.shape",
        "assert kernels.qk_norm_rope(q, k, w, w)[0].shape == q.shape",
        "x = torch.randn(2, 8, 4, 4)",
        "assert kernels.group_norm(x, 2).shape == x.shape and kernels.GroupNorm(2, 8)(x).shape == x.shape",
        "leaked = sorted(m for m in sys.modules if m.startswith(('kiln.engine', 'kiln.model')))",
        "assert not leaked, leaked",
        "print('ok')",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
