"""Ahead-of-time compile of the multi-client LoRA kernels for sm_80 and sm_90 on the CPU (no GPU needed).

Every GPU config row x every kernel use (forward shrink/expand, backward gh/dx/dA/dB) is compiled with
``triton.compile(ASTSource, GPUTarget)``; we assert it compiles, its shared memory fits the target
(sm_80: 163 KiB, sm_90: 227 KiB per block) and the PTX uses tensor-core instructions (``mma``/``wgmma``).
Run: FEDKERNELS_TIER=compile python -m pytest tests/ops/compile_tier/test_compile_multi_lora.py
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    pytest.skip("the compile tier needs the real triton compiler (TRITON_INTERPRET unset)", allow_module_level=True)
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fedkernels.ops import triton_multi_lora as tm  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
INDEX_ARGS = ("PERM", "SEG_START", "SEG_LEN", "RANKS")  # int32 at runtime; SEG_CLIENT is int64

# kernel use -> (kernel, pointer dtypes, unit strides (contiguous inner dims, specialised to 1 like at runtime),
#               HAS_SCALE); the layouts are those the launchers pass (see MultiLoRATritonFunction)
USES = {
    "shrink_fwd_h": ("shrink", {"X": "*bf16", "W": "*bf16", "OUT": "*fp32"}, ("sx_k", "sw_k", "so_r"), False),
    "shrink_bwd_gh": ("shrink", {"X": "*bf16", "W": "*bf16", "OUT": "*fp32"}, ("sx_k", "sw_r", "so_r"), True),
    "expand_fwd_y": ("expand", {"P": "*fp32", "W": "*bf16", "Y": "*bf16"}, ("sp_r", "sw_r", "sy_n"), True),
    "expand_bwd_dx": ("expand", {"P": "*fp32", "W": "*bf16", "Y": "*bf16"}, ("sp_r", "sw_n", "sy_n"), False),
    "grad_dA": ("grad", {"P": "*fp32", "Q": "*bf16", "OUT": "*fp32"}, ("sp_r", "sq_n", "so_n"), False),
    "grad_dB": ("grad", {"P": "*fp32", "Q": "*bf16", "OUT": "*fp32"}, ("sp_r", "sq_n", "so_n"), True),
}


def blocks(kind, cfg, br, split):
    if kind == "shrink":
        return {"BLOCK_M": cfg.shrink_m, "BLOCK_K": cfg.shrink_k, "BLOCK_R": br, "SPLIT_K": split}
    if kind == "expand":
        return {"BLOCK_M": cfg.expand_m, "BLOCK_N": cfg.expand_n, "BLOCK_R": br}
    return {"BLOCK_T": cfg.grad_t, "BLOCK_N": cfg.grad_n, "BLOCK_R": br, "SPLIT_T": split}


def compile_use(use, br, arch, *, atomic=False):
    kind, ptrs, unit, has_scale = USES[use]
    fn = tm.KERNELS[kind]
    cfg = tm.GPU_CONFIGS[br]
    split = cfg.shrink_split if kind == "shrink" else cfg.grad_split
    const = {**blocks(kind, cfg, br, split), "HAS_SCALE": has_scale, "PRECISION": "ieee"}
    if kind != "expand":
        const["ATOMIC"] = atomic
    const.update({s: 1 for s in unit})
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in INDEX_ARGS:
            sig[name] = "*i32"
        elif name == "SEG_CLIENT":
            sig[name] = "*i64"
        elif name == "SCALES":
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("br", sorted(tm.GPU_CONFIGS))
@pytest.mark.parametrize("use", sorted(USES))
def test_compiles_fits_and_uses_tensor_cores(use, br, arch):
    kernel = compile_use(use, br, arch)
    ptx = kernel.asm["ptx"]
    shared = kernel.metadata.shared
    assert 0 < shared <= SMEM_LIMIT[arch], f"{use} BLOCK_R={br} sm_{arch}: {shared} B of shared memory"
    assert "mma" in ptx, f"{use} BLOCK_R={br} sm_{arch}: no tensor-core instruction in the PTX"
    assert kernel.asm.get("cubin"), "ptxas produced no cubin"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("use", ["shrink_fwd_h", "grad_dA"])
def test_atomic_split_variants_compile(use, arch):
    """Default (non-deterministic) mode: split reductions combined with atomics (red/atom in the PTX)."""
    kernel = compile_use(use, 16, arch, atomic=True)
    ptx = kernel.asm["ptx"]
    assert "mma" in ptx
    assert "red." in ptx or "atom." in ptx
