"""Ahead-of-time compile of Triton kernels for Hopper (sm_90a) without a GPU.

CI has no GPU, so it cannot launch kernels; it can still compile them to a cubin for sm_90a with
Triton's own ptxas and read what matters off the result: registers, spills and shared memory
(``ptxas -v``), and from the disassembly (``nvdisasm``) whether the dots run on Hopper's
warpgroup tensor-core instructions (HGMMA, not the older HMMA), how wide the global loads are
(16-byte vectors, or 2-byte scalars), whether anything went to local memory (LDL/STL) and
whether the code calls subroutines (CALL: emulated 64-bit integer division, for one). The same
facts are read off the csrc extension's compiled CUDA kernels (``csrc_sass_facts``).

The compile is specialised the way Triton's JIT specialises a real launch: pointers from torch
allocations and integer arguments that are multiples of 16 carry ``tt.divisibility=16``, and an
integer equal to 1 (a unit stride) becomes a constant. Without that, every load is a scalar
load; the 2026-11-24 reports were made so: scalar 2-byte loads everywhere and a D = 128 attention
backward said to spill 944 bytes at 4 warps (32 bytes when specialised like the real launch).

Run this in a process without TRITON_INTERPRET (under the interpreter, ``@triton.jit`` returns
interpreter wrappers that cannot be compiled); tests do so in a subprocess.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def _bits(opcode: str) -> int:
    """Access width of a global load opcode (LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32)."""
    parts = opcode.split(".")
    for p in parts[::-1]:
        if p in ("128", "64"):
            return int(p)
        if p in ("U16", "S16"):
            return 16
        if p in ("U8", "S8"):
            return 8
    return 32


def sass_facts(cubin: bytes) -> dict:
    """Instruction facts from the disassembly of ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    return _facts(text)


def resource_usage(cubin: bytes) -> dict:
    """Registers a thread and stack-frame bytes (where spilled registers live; 0 for our kernels
    unless something spilled) of ``cubin`` as the GPU will load it (``cuobjdump -res-usage``).
    Read from Triton's own cubin, not from a separate ptxas run: for sm_100 / sm_120 Triton 3.8
    runs its CUDA 13 ptxas with ``--regAllocOptLevel=2``, and without it the spills differ (dq
    64x64/w4/s3 at D = 128 on sm_120a: 0 bytes by a plain ptxas, 96 in Triton's build)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK):(\d+)", text))
    return {"registers": int(usage["REG"]), "stack_bytes": int(usage["STACK"])}


def csrc_sass_facts(library: str, arch: str = "sm_90a") -> dict[str, dict]:
    """The same facts for every CUDA kernel compiled into a shared library (the csrc extension),
    read with ``cuobjdump -sass``; keys are demangled names without namespaces or parameters,
    e.g. ``gn_cl_partials<c10::BFloat16, 8>``."""
    text = subprocess.run([_tool("cuobjdump"), "-arch", arch, "-sass", library], capture_output=True, text=True,
                          check=True).stdout
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.M)
    return {name: _facts(body) for name, body in zip(_short_names(parts[1::2]), parts[2::2], strict=True)}


def embedded_ptx(library: str) -> dict[str, str]:
    """The PTX a shared library carries, by file ("group_norm_cuda.sm_80.ptx": compute_80 code of
    group_norm_cuda.cu), which the driver compiles at load for a GPU no machine code in it runs on
    (``cuobjdump -xptx``)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([_tool("cuobjdump"), "-xptx", "all", library], cwd=tmp, capture_output=True, check=True)
        return {p.name: p.read_text() for p in sorted(Path(tmp).glob("*.ptx"))}


def _short_names(mangled: list[str]) -> list[str]:
    """Demangled names without namespaces or parameters (one c++filt call; mangled if it is absent)."""
    try:
        out = subprocess.run(["c++filt", *mangled], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    names = [full.replace("(anonymous namespace)::", "").split("(")[0] for full in out]  # drop parameters
    return [re.sub(r"^(?:void )?(?:\w+::)*", "", name) for name in names]


def _instructions(text: str) -> tuple[list[str], dict[str, int]]:
    """Instructions of a disassembly in order, and the index each address or label starts at
    (cuobjdump writes branch targets as addresses, nvdisasm as ``.L_x_N`` labels)."""
    code, where, pending = [], {}, []
    for line in text.splitlines():
        label = re.match(r"\s*(\.L\w+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            for name in [f"0x{int(m.group(1), 16):x}", *pending]:
                where[name] = len(code)
            pending = []
            code.append(m.group(2))
    return code, where


def _load_bits(instruction: str) -> int | None:
    """Access width of a global load (or cp.async copy) instruction; None for any other."""
    m = re.search(r"\bLDG(?:STS)?((?:\.\w+)*)\s", instruction)
    return _bits("LDG" + m.group(1)) if m else None


def trip_vector_loads(text: str, bits: int = 128) -> int:
    """The most 16-byte global loads (LDG.E.128, or LDGSTS.E.128 cp.async copies; ``bits``-wide
    ones if given) one trip of an innermost loop issues, per thread: what a streaming loop keeps
    in flight unless the compiler overlaps trips (loops are read off backward branches;
    innermost: containing no other). nvcc unrolls a plain strided loop 4x on its own (4 loads a
    trip); a loop with carried index arithmetic it may leave at 1."""
    wide = [sum(1 for ins in body if _load_bits(ins) == bits) for body in _innermost_loops(text)]
    return max(wide, default=0)


def _innermost_loops(text: str) -> list[list[str]]:
    """The instructions of each innermost loop of a disassembly (loops read off backward branches;
    innermost: containing no other)."""
    code, where = _instructions(text)
    loops = []
    for i, ins in enumerate(code):
        m = re.search(r"\bBRA(?:\.\w+)*\s+(?:`\()?(0x[0-9a-f]+|\.L\w+)", ins)
        if m and m.group(1) in where and where[m.group(1)] <= i:
            loops.append((where[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [code[a:b + 1] for a, b in inner]


def mma_loop_ops(text: str) -> dict[str, int]:
    """Opcode counts (root names: FMUL, FFMA, FSEL, ...) of the shortest innermost loop that issues
    HGMMA, its length under "total" (an attention kernel's steady-state key or query loop, what
    one thread issues a trip), under "hgmma_macs" the multiply-adds its HGMMAs do for one warp
    group (the m·n·k of each shape, HGMMA.64x32x16 -> 32768) and under "ex2_beside_mma" how many
    of its exp2s (MUFU.EX2) issue while a warpgroup MMA is in flight (_ex2_beside_mma). Empty
    without such a loop."""
    bodies = [b for b in _innermost_loops(text) if any(re.match(r"(?:@!?U?P\w+\s+)?HGMMA", i) for i in b)]
    if not bodies:
        return {}
    body = min(bodies, key=len)
    ops = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", i).group(1) for i in body)
    shapes = [re.search(r"HGMMA\.(\d+)x(\d+)x(\d+)", i) for i in body]
    macs = sum(int(m.group(1)) * int(m.group(2)) * int(m.group(3)) for m in shapes if m)
    return {"total": len(body), "ex2_beside_mma": _ex2_beside_mma(body), "hgmma_macs": macs,
            **dict(sorted(ops.items()))}


def _ex2_beside_mma(body: list[str]) -> int:
    """MUFU.EX2 instructions of one loop trip issued while a warpgroup MMA is in flight: after an
    HGMMA and before the ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` that waits for every one (a wait that
    leaves some pending keeps the state). Walked twice, so the second trip starts in the state the
    first one's end leaves (an MMA issued at the end of a trip and waited for in the next)."""
    in_flight, count = False, 0
    for trip in range(2):
        for ins in body:
            op = re.sub(r"^@!?U?P\w+\s+", "", ins)
            if op.startswith("HGMMA"):
                in_flight = True
            elif re.match(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", op):
                in_flight = False
            elif trip and in_flight and op.startswith("MUFU.EX2"):
                count += 1
    return count


def _facts(text: str) -> dict:
    ops = collections.Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", text))
    loads = collections.Counter()
    for op, n in ops.items():
        if op.startswith(("LDG.", "LDGSTS.")):
            loads[_bits(op)] += n
    return {
        "hgmma": sum(n for op, n in ops.items() if op.startswith("HGMMA")),
        "hmma": sum(n for op, n in ops.items() if op.startswith("HMMA")),
        "tma_loads": sum(n for op, n in ops.items() if op.startswith("UTMALDG")),
        # bulk tensor reductions (cp.reduce.async.bulk.tensor: the TMA unit adds a tile in L2)
        "tma_reduces": sum(n for op, n in ops.items() if op.startswith("UTMAREDG")),
        # cp.async copies global -> shared (Triton's software pipelining of a loop's loads)
        "async_copies": sum(n for op, n in ops.items() if op.startswith("LDGSTS")),
        "global_load_bits": {str(k): v for k, v in sorted(loads.items())},
        "local_ops": sum(n for op, n in ops.items() if op.startswith(("LDL", "STL"))),
        # global atomic adds: REDG.E.ADD (no return value, what an unused tl.atomic_add becomes) or
        # ATOMG.E.ADD; not the ATOMG.E.EXCH with which in-kernel tensor descriptors are published
        "atomic_adds": sum(n for op, n in ops.items() if op.startswith(("RED", "ATOMG")) and ".ADD" in op),
        # subroutine calls, e.g. the ~70-instruction emulated 64-bit integer division
        "calls": sum(n for op, n in ops.items() if op.startswith("CALL")),
        "trip_vector_loads": trip_vector_loads(text),
        "trip_loads_32": trip_vector_loads(text, 32),  # 4-byte ones: QK-norm+RoPE's rows at bf16 D = 128
        "mma_loop_ops": mma_loop_ops(text),
    }


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int | None, arch: int,
             aligned: tuple[str, ...], ones: tuple[str, ...], max_registers: int | None = None):
    """``triton.compile`` of ``fn`` for compute capability ``arch`` (90: sm_90a), specialised as a
    real launch is (see compile_sm90); returns the compiled kernel and the constexprs with the
    unit strides added."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling for a GPU needs TRITON_INTERPRET unset (run it in a clean process)")
    ones = tuple(k for k in ones if k in fn.arg_names)
    signature = {k: v for k, v in signature.items() if k not in ones}
    constexprs = {**constexprs, **dict.fromkeys(ones, 1)}
    div16 = [k for k, v in signature.items() if v.startswith("*") or k in aligned]
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16}
    full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    sig = {name: full[name] for name in fn.arg_names}  # in the kernel's argument order
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {}),
               **({"maxnreg": max_registers} if max_registers else {})}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, constexprs


def compile_for_arch(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int | None = None,
                     arch: int = 80, *, aligned: tuple[str, ...] = (), ones: tuple[str, ...] = ()) -> dict:
    """Shared memory, registers, stack bytes (spills) and MMA instructions of ``fn`` as Triton
    builds it for compute capability ``arch`` (80: Ampere, as Triton lays out sm_86 / sm_89,
    checked 2026-12-06 on every attention candidate; 100: sm_100a; 120: sm_120a): whether a launch
    config fits a GPU's shared memory a program (an A100's 163 KB, an RTX / L40S-class GPU's
    99 KB, ...) and runs without spills. Hopper's numbers differ (its TMA and warpgroup-MMA
    layouts: dK/dV at D = 128, 128x64/w8/s2, takes 181 KB and no spill on sm_90a, 113 KB and
    18 KB of spills on sm_80)."""
    compiled, _ = _compile(fn, signature, constexprs, num_warps, num_stages, arch, aligned, ones)
    ptx = compiled.asm["ptx"]
    return {"shared_bytes": compiled.metadata.shared, **resource_usage(compiled.asm["cubin"]),
            "mma": [m for m in ("mma.sync", "wgmma", "tcgen05.mma") if m in ptx]}


def in_parallel(calls: list) -> list:
    """``[call() for call in calls]`` on a thread pool of one thread per CPU: ahead-of-time builds,
    where ptxas, nvdisasm and most of Triton's passes run outside the GIL. On 2 cores, cold
    cache: the attention's sm_90a check 172 s (363 s serially), its builds for three other GPU
    families 2.6 min (5.6 min)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(lambda call: call(), calls))


def ptxas_report(ptx: str, arch: str, tool: str = "ptxas") -> dict:
    """Registers and spilled bytes (stores plus loads) that ptxas reports for ``ptx`` (of its first
    kernel; spills summed over all); ``tool`` "ptxas-blackwell" is Triton's CUDA 13 one, which
    takes the PTX ISA 9.0 that nvcc 13 writes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([_tool(tool), f"-arch={arch}", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    info = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", info)
    return {"registers": int(regs.group(1)) if regs else None, "spills": sum(int(s) for s in spill)}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int | None = None, *,
                 aligned: tuple[str, ...] = (), ones: tuple[str, ...] = (), max_registers: int | None = None) -> dict:
    """Compile ``fn`` for sm_90a as a real launch would be specialised; return its resource report.

    ``signature`` maps argument names to Triton types ("*bf16", "i32", "fp32"). Every pointer is
    taken as 16-byte aligned; ``aligned`` names the integer arguments that are multiples of 16 on
    the shapes that matter (strides of real tensors) and ``ones`` those equal to 1 (unit strides);
    ``max_registers`` is the launch's register cap (Triton's maxnreg).
    """
    compiled, constexprs = _compile(fn, signature, constexprs, num_warps, num_stages, 90, aligned, ones,
                                    max_registers)
    ptx = compiled.asm["ptx"]
    cubin = compiled.asm["cubin"]
    assert len(cubin) > 0
    return {
        "kernel": fn.__name__,
        "constexprs": {k: v for k, v in constexprs.items()},
        "num_warps": num_warps,
        "num_stages": num_stages,
        **ptxas_report(ptx, "sm_90a"),
        "shared_bytes": compiled.metadata.shared,
        # warp specialisation shows as more warps launched than asked for (a producer group and a
        # second consumer group) and register reallocation between the groups (setmaxnreg)
        "warps_launched": compiled.metadata.num_warps,
        "setmaxnreg": ptx.count("setmaxnreg."),
        **sass_facts(cubin),
    }


def wide_load_share(report: dict) -> float:
    """Fraction of a kernel's global load instructions that move 16 bytes."""
    bits = report["global_load_bits"]
    total = sum(bits.values())
    return bits.get("128", 0) / total if total else 0.0


# One Hopper SM (H100 and H200 alike): 64K 32-bit registers, allocated per warp in units of 256;
# at most 64 resident warps and 32 resident programs; 228 KB of shared memory, 1 KB of it
# reserved per resident program (CUDA occupancy rules for compute capability 9.0).
SM90_REGISTERS = 65536
SM90_REGISTER_UNIT = 256
SM90_MAX_WARPS = 64
SM90_MAX_PROGRAMS = 32
SM90_SHARED_BYTES = 228 * 1024
SM90_SHARED_RESERVED = 1024


def resident_programs(report: dict) -> int:
    """How many programs of a compiled kernel (compile_sm90's report) one SM holds at once: the
    least of what its registers, its shared memory and the SM's warp and program limits allow."""
    warps = report["warps_launched"]
    per_warp = -(-report["registers"] * 32 // SM90_REGISTER_UNIT) * SM90_REGISTER_UNIT
    by_registers = (SM90_REGISTERS // per_warp) // warps
    by_shared = SM90_SHARED_BYTES // (report["shared_bytes"] + SM90_SHARED_RESERVED)
    return min(by_registers, by_shared, SM90_MAX_WARPS // warps, SM90_MAX_PROGRAMS)
