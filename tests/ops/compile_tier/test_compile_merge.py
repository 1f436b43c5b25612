"""AOT compile of the merge kernel for sm_80 / sm_90 on the CPU (triton 3.9 `triton.compile(ASTSource, target)`).

Asserts: it compiles, shared memory fits (227 KB per block on H100, 163 KB on A100), and the half-precision and
TF32 main loops use tensor cores (`mma.sync` on sm_80, `wgmma` on sm_90)."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fedkernels.ops.triton_merge import DEFAULT_CONFIG, merge_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="codegen needs the real compiler")

SMEM = {80: 163 * 1024, 90: 227 * 1024}


def _sig(dt: str) -> dict[str, str]:
    sig = {"w_ptr": f"*{dt}", "a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "OUT": "i32", "IN": "i32", "S": "i32",
           "stride_wm": "i64", "stride_wo": "i32", "stride_wi": "i32",
           "stride_am": "i64", "stride_as": "i32", "stride_ai": "i32",
           "stride_bm": "i64", "stride_bo": "i32", "stride_bs": "i32", "scale": "fp32"}
    sig.update({k: "constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PRECISION")})
    return sig


def _compile(dt: str, arch: int, ieee: bool, cfg=DEFAULT_CONFIG):
    src = ASTSource(fn=merge_kernel, signature=_sig(dt), constexprs=dict(cfg, PRECISION="ieee" if ieee else "tf32"))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dt", ["fp16", "bf16", "fp32"])
def test_compiles_with_tensor_cores(dt, arch):
    k = _compile(dt, arch, ieee=False)
    assert 0 < k.metadata.shared <= SMEM[arch]
    ptx = k.asm["ptx"]
    assert ("wgmma" if arch == 90 else "mma.sync") in ptx
    assert "mma" in ptx


@pytest.mark.parametrize("arch", [80, 90])
def test_ieee_fp32_compiles(arch):
    k = _compile("fp32", arch, ieee=True)
    assert k.metadata.shared <= SMEM[arch]
    assert "fma.rn.f32" in k.asm["ptx"]
