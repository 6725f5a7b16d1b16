"""Ahead-of-time compile of Triton kernels for Hopper (sm_90a) without a GPU.

CI has no GPU, so it cannot launch kernels; it can still compile them to PTX and a cubin for
sm_90a with Triton's own ptxas, and read registers, shared memory and spills from
``ptxas -v``. Run this in a process without TRITON_INTERPRET (under the interpreter,
``@triton.jit`` returns interpreter wrappers that cannot be compiled); tests do so in a
subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path


def _ptxas() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(path) if path.exists() else "ptxas"


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4) -> dict:
    """Compile ``fn`` for sm_90a; return name, registers, shared memory, spill bytes, PTX size."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_sm90 needs TRITON_INTERPRET unset (run it in a clean process)")
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    info = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", info)
    return {
        "kernel": fn.__name__,
        "constexprs": {k: v for k, v in constexprs.items()},
        "num_warps": num_warps,
        "registers": int(regs.group(1)) if regs else None,
        "shared_bytes": compiled.metadata.shared,
        "spills": sum(int(s) for s in spill),
        "ptx_lines": ptx.count("\n"),
    }
