"""Ahead-of-time compiles of every Triton LoRA linear kernel and GPU config, on the CPU (no GPU needed).

Run: FEDKERNELS_TIER=compile pytest tests/ops/compile_tier (TRITON_INTERPRET must be unset). For each arch's
config row (`GPU_CONFIGS`) and dtype: the kernels compile to PTX and cubin (the PyPI wheel bundles ptxas),
their shared memory fits the arch's per-block limit, and their dots use tensor cores (``mma``; ``wgmma`` for
the fused GEMMs on sm_90, whose 128-row tiles fill a warpgroup's m64 instruction).
"""

import dataclasses
import os

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from fedkernels.ops.triton_lora import (  # noqa: E402
    GEMM_CANDIDATES,
    GPU_CONFIGS,
    SMEM_LIMIT_BYTES,
    compile_specs,
)

assert os.environ.get("TRITON_INTERPRET") != "1", "the compile tier needs the real compiler, not the interpreter"

CASES = [
    (90, torch.bfloat16, False), (90, torch.bfloat16, True), (90, torch.float16, False), (90, torch.float32, False),
    (80, torch.bfloat16, False), (80, torch.bfloat16, True), (80, torch.float32, False),
    (86, torch.bfloat16, False), (86, torch.float32, True),
]


def _compile(spec, arch):
    src = triton.compiler.ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


@pytest.mark.parametrize("arch,dtype,dropout", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_kernels_compile_fit_smem_and_use_tensor_cores(arch, dtype, dropout):
    specs = compile_specs(arch, dtype, rank=16, dropout=dropout)
    assert {s.name for s in specs} == {"shrink_fwd", "shrink_gh", "gemm_fwd", "gemm_dx", "skinny_dA", "skinny_dB"}
    for spec in specs:
        kernel = _compile(spec, arch)
        ptx = kernel.asm["ptx"]
        assert kernel.asm.get("cubin"), f"{spec.name} sm_{arch}: no cubin"
        assert f".target sm_{arch}" in ptx, f"{spec.name}: PTX not for sm_{arch}"
        shared = kernel.metadata.shared
        assert 0 < shared <= SMEM_LIMIT_BYTES[arch], f"{spec.name} sm_{arch} {dtype}: {shared} B shared memory"
        assert "mma" in ptx, f"{spec.name} sm_{arch} {dtype}: no tensor-core instruction in the PTX"
        if spec.name.startswith("gemm") and arch == 90:
            assert "wgmma" in ptx, f"{spec.name} sm_90 {dtype}: fused GEMM does not use wgmma"
        if dropout and spec.name in ("shrink_fwd", "gemm_dx", "skinny_dA"):
            assert "mul.hi.u64" in ptx or "mul.hi.u32" in ptx or "mad.hi" in ptx, f"{spec.name}: no Philox in PTX"


@pytest.mark.parametrize("arch", [90])
def test_fp32_ieee_compiles_and_fits(arch):
    # fp32 inputs without TF32 (torch's default) take the FMA path: no tensor cores, but it must compile and fit.
    for spec in compile_specs(arch, torch.float32, precision="ieee"):
        kernel = _compile(spec, arch)
        assert 0 < kernel.metadata.shared <= SMEM_LIMIT_BYTES[arch], (spec.name, kernel.metadata.shared)
        assert "fma.rn.f32" in kernel.asm["ptx"], f"{spec.name}: no fp32 FMA main loop"


@pytest.mark.parametrize("rank", [1, 64])
def test_rank_block_extremes_compile(rank):
    # R=1 pads the rank tile to 16 (tl.dot minimum); R=64 is the widest shrink rank tile.
    for spec in compile_specs(90, torch.bfloat16, rank=rank):
        if spec.name.startswith(("shrink", "skinny")):
            kernel = _compile(spec, 90)
            assert kernel.metadata.shared <= SMEM_LIMIT_BYTES[90] and "mma" in kernel.asm["ptx"]


def test_config_table_covers_every_arch_and_dtype():
    for arch in (80, 86, 90):
        for size in (2, 4):
            cfg = GPU_CONFIGS[(arch, size)]
            # The pipeline estimate of the fused GEMM must leave headroom under the per-block limit.
            est = cfg.gemm_stages * (cfg.gemm_m * cfg.gemm_k + cfg.gemm_k * cfg.gemm_n) * size
            assert est <= SMEM_LIMIT_BYTES[arch] * 0.8, (arch, size, est)


def test_kernel_config_rejects_bad_blocks():
    from fedkernels.ops.triton_lora import KernelConfig

    with pytest.raises(ValueError, match="gemm_n must be a positive power of two, got 96"):
        KernelConfig(128, 96, 64, 4, 3, shrink_t=32, shrink_k=64, skinny_t=64, skinny_n=64)
    with pytest.raises(ValueError, match=">= 16"):
        KernelConfig(128, 128, 8, 4, 3, shrink_t=32, shrink_k=64, skinny_t=64, skinny_n=64)


@pytest.mark.parametrize("arch", [80, 90])
def test_autotune_candidates_compile_and_fit(arch):
    base = GPU_CONFIGS[(arch, 2)]
    for m, n, k, w, st in GEMM_CANDIDATES[arch]:
        cfg = dataclasses.replace(base, gemm_m=m, gemm_n=n, gemm_k=k, gemm_warps=w, gemm_stages=st)
        for spec in compile_specs(arch, torch.bfloat16, config=cfg):
            if spec.name == "gemm_fwd":
                kernel = _compile(spec, arch)
                assert kernel.metadata.shared <= SMEM_LIMIT_BYTES[arch], (cfg, kernel.metadata.shared)
                assert "mma" in kernel.asm["ptx"]
