"""Kernel resource use as a CI-checked property (no GPU needed): ``fastvit.kernels.resources``.

Every Triton config the launchers may pick (attention autotuner candidates for bf16/fp16 at head dims 64, 72 and 128,
the attention kernels with the qk-norm/RoPE prologue at its own candidates (sm_90a, bf16),
the patch-embedding tiles for ViT-B/16 shapes) is compiled ahead of time for sm_90a and sm_80 with the installed
Triton's ptxas, and must not spill or need more shared memory than the arch allows. The extension's CUDA kernels
are read from the built fastvit._C: no stack frame, at most 64 registers (float64 ones exempt). The full matrix
(every table entry, every head dim 32-128 in steps of 8, fp32) is the tool's ``--all``; its output is committed under
benchmarks/results/.
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest
from fastvit.kernels import resources

pytest.importorskip("triton")
needs_aot_compile = pytest.mark.skipif(
    resources.unsupported_reason() is not None, reason=str(resources.unsupported_reason())
)


@pytest.fixture(scope="module")
def launchable_rows():
    """Compile every launchable config for both archs (the expensive part: a few minutes on 2 cores)."""
    launches = {arch: resources.triton_launches(arch, full=False) for arch in resources.ARCHS}
    return resources.compile_rows(launches, progress=lambda line: print(line, flush=True))


@needs_aot_compile
def test_launchable_triton_configs_do_not_spill_and_fit_shared_memory(launchable_rows):
    print(resources.render(launchable_rows, [], "not read here", markdown=False))
    assert {row.arch for row in launchable_rows} == set(resources.ARCHS)
    problems = resources.failures(launchable_rows)
    assert not problems, "configs the launchers may pick spill or overflow shared memory:\n" + "\n".join(problems)


def test_the_check_compiles_what_the_launchers_autotuner_is_given():
    # The launcher's prune step (what the autotuner benchmarks on a GPU) and the compiled set must be the same configs
    # for every arch, kernel, dtype and head dim the CI check covers.
    import torch
    from fastvit.kernels import attention as kernel_tables

    from fastvit.ops.triton import attention as attention_launcher

    for arch_name, (arch, _sms) in resources.ARCHS.items():
        launches = resources.attention_launches(arch, full=False)
        for kind in ("fwd", "dkdv", "dq"):
            tuned = attention_launcher._autotuned(kind, arch, 1)
            for dtype_name in resources.CI_DTYPES:
                dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype_name])
                for head_dim in resources.CI_HEAD_DIMS:
                    block_d = kernel_tables.block_d(head_dim)
                    pruned = tuned.early_config_prune(
                        tuned.configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d
                    )
                    given = {str((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)) for c in pruned}
                    compiled = {
                        launch.config
                        for launch in launches
                        if (launch.kernel, launch.dtype, launch.case)
                        == (f"attention.{kind}", dtype_name, f"D={head_dim}")
                    }
                    assert compiled == given, (arch_name, kind, dtype_name, head_dim)


def test_prologue_launches_are_the_launchers_prologue_candidates():
    # A qk-norm/RoPE launch's prune step (the ROPE/Q_NORM/K_NORM constexprs among its arguments) hands the autotuner
    # the prologue lists: the check compiles exactly those for every prologue case, on sm_90a, bf16.
    import torch
    from fastvit.kernels import attention as kernel_tables

    from fastvit.ops.triton import attention as attention_launcher

    launches = resources.attention_prologue_launches(90, full=False)
    assert {launch.case for launch in launches} == {case.label for case in resources.PROLOGUE_CASES}
    for kind in ("fwd", "dkdv", "dq"):
        tuned = attention_launcher._autotuned(kind, 90, 1)
        for case in resources.PROLOGUE_CASES:
            block_d = kernel_tables.block_d(case.head_dim)
            args = dict(BLOCK_D=block_d, ROPE=case.rope, Q_NORM=case.norm, K_NORM=case.norm)
            pruned = tuned.early_config_prune(tuned.configs, {"Q": torch.empty(0, dtype=torch.bfloat16)}, **args)
            given = {str((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)) for c in pruned}
            compiled = {launch.config for launch in launches
                        if (launch.kernel, launch.case) == (f"attention.{kind}", case.label)}  # fmt: skip
            assert compiled == given, (kind, case.label)
            plain = set(map(str, kernel_tables.autotune_configs(kind, 90, block_d, 2)))
            assert given != plain, (kind, case.label)  # the prologue's own lists, not the plain table's


def _rows_of(rows, launches_by_arch: dict) -> list:
    """The compiled rows (of the module's full check) of these launches: one compile serves both checks."""
    keys = {(arch, launch.compile_key()) for arch, launches in launches_by_arch.items() for launch in launches}
    return [row for row in rows if (row.arch, row.launch.compile_key()) in keys]


@needs_aot_compile
def test_prologue_launches_do_not_spill(launchable_rows):
    # The attention kernels with the prologue (rotate-half RoPE + LayerNorm, varlen too; interleaved RoPE; RMSNorm; at
    # D = 128 LayerNorm) at every config the launcher keeps for such a launch: no spill, shared memory within the
    # limit. Quick check while editing the kernels: `python -m fastvit.kernels.resources --kernel attention`.
    launches = resources.attention_prologue_launches(90, full=False)
    rows = _rows_of(launchable_rows, {"sm_90a": launches})
    assert len(rows) == len({launch.compile_key() for launch in launches})  # every one is in the full check
    print(resources.render(rows, [], "not read here", markdown=False))
    assert rows and not any(row.error for row in rows)
    problems = resources.failures(rows)
    assert not problems, "prologue configs spill or overflow shared memory:\n" + "\n".join(problems)


def test_patch_embed_launches_are_the_launchers_choice():
    # Recorded from fastvit/ops/triton/patch_embed.py's launchers: forward, dX, dW and the column sum, both layouts,
    # float and uint8 images, with the tile sizes the heuristic gives at batch 1 and 64.
    launches = resources.patch_embed_launches(90, 132, full=False)
    kinds = {launch.kernel for launch in launches}
    assert kinds == {f"patch_embed.{k}" for k in ("fwd", "bwd_input", "bwd_weight", "bwd_colsum", "norm_fwd")}
    cases = " ".join(launch.case for launch in launches)
    for layout in ("NCHW", "channels_last", "uint8 NHWC"):
        assert layout in cases
    assert all(dict(launch.kwargs).get("num_stages", 3) >= 1 for launch in launches)
    normed = [launch for launch in launches if launch.kernel == "patch_embed.norm_fwd"]
    assert {dict(launch.kwargs)["SAVE"] for launch in normed} == {True, False}  # training and inference
    assert all("AIMv2-L/14" in launch.case and dict(launch.kwargs)["BLOCK_D"] == 128 for launch in normed)


@needs_aot_compile
def test_patch_embed_norm_variant_does_not_spill(launchable_rows):
    # The normed forward (a full-row epilogue: each program walks all 8 D tiles of AIMv2-L twice) at the tiles its
    # launcher picks, both archs: no spill, shared memory within the limit.
    launches = {
        arch: [launch for launch in resources.patch_embed_launches(*resources.ARCHS[arch], full=False)
               if launch.kernel == "patch_embed.norm_fwd"]
        for arch in resources.ARCHS
    }  # fmt: skip
    rows = _rows_of(launchable_rows, launches)
    assert len(rows) == len({(arch, launch.compile_key()) for arch, ls in launches.items() for launch in ls})
    print(resources.render(rows, [], "not read here", markdown=False))
    assert rows and not any(row.error for row in rows)
    problems = resources.failures(rows)
    assert not problems, "normed patch-embedding configs spill or overflow shared memory:\n" + "\n".join(problems)


def test_linear_launches_are_the_launchers_config_tables():
    # The fused GEMM's autotuner gets candidate_configs(kind, arch, elem_bytes): the check compiles exactly those, for
    # the forward and both backward kernels at each of resources.LINEAR_CASES, in launch order; on sm_90a also the
    # persistent TMA forward (hopper_path), at the forward's cases.
    from fastvit.kernels import linear as kernels

    from fastvit.ops.triton import linear as launcher

    for arch_name, (arch, _sms) in resources.ARCHS.items():
        launches = resources.linear_launches(arch, full=False)
        tma_kinds = launcher.TMA_KINDS if arch == 90 else ()
        assert {launch.kernel for launch in launches} >= {f"linear.{kind}" for kind in launcher.KINDS + tma_kinds}
        assert arch == 90 or not any(launch.kernel.endswith("_tma") for launch in launches), arch_name
        for kind in launcher.KINDS + tma_kinds:
            for dtype_name in resources.CI_DTYPES:
                compiled = {
                    (launch.case, launch.config)
                    for launch in launches
                    if (launch.kernel, launch.dtype) == (f"linear.{kind}", dtype_name)
                }
                given = {str(e) for swiglu in (False, True) for e in launcher.candidate_configs(kind, arch, 2, swiglu)}
                assert {config for _, config in compiled} == given, (arch_name, kind, dtype_name)
                cases = sum(kind.removesuffix("_tma") in c.kinds for c in resources.LINEAR_CASES)
                assert len({case for case, _ in compiled}) == cases
        for launch in launches:  # every required runtime argument of the kernel, no more (defaulted ones: keywords)
            fn = getattr(kernels, launch.function)
            params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()  # the Python function under the JIT
            runtime = [
                p for p in params if "constexpr" not in str(p.annotation) and p.default is inspect.Parameter.empty
            ]
            assert len(launch.args) == len(runtime), (launch.function, len(launch.args), len(runtime))


def test_keep_config_uses_each_arch_shared_memory_limit():
    from fastvit.kernels import attention as tables

    # (128, 128, 8, 3) at BLOCK_D = 128 in bf16 needs 224 KiB: under sm_90's 227 KiB, over sm_80's 163 KiB.
    assert tables.keep_config("fwd", 128, 128, 3, 128, 2, arch=90)
    assert not tables.keep_config("fwd", 128, 128, 3, 128, 2, arch=80)
    assert tables.shared_memory_limit(90) == 227 * 1024 and tables.shared_memory_limit(80) == 163 * 1024
    assert tables.shared_memory_limit(86) == 99 * 1024  # consumer Ampere / Ada: less than A100
    assert tables.shared_memory_limit(75 + 20) == min(tables.SHARED_MEMORY_PER_BLOCK.values())  # unknown: smallest
    with pytest.raises(ValueError, match="arch"):
        tables.shared_memory_limit(75)
    with pytest.raises(TypeError, match="arch"):
        tables.shared_memory_limit(9.0)


def test_autotune_configs_fit_the_arch_or_fall_back(monkeypatch):
    from fastvit.kernels import attention as tables

    for arch in (80, 86, 89, 90, 100, 120):
        for kind in ("fwd", "dkdv", "dq"):
            for block_d in (32, 64, 128):
                for elem_bytes in (2, 4):
                    configs = tables.autotune_configs(kind, arch, block_d, elem_bytes)
                    assert configs, (arch, kind, block_d, elem_bytes)
                    for block_m, block_n, _warps, stages in configs:
                        if (block_m, block_n, _warps, stages) != tables.FALLBACK_CONFIGS[kind]:
                            assert tables.keep_config(kind, block_m, block_n, stages, block_d, elem_bytes, arch)
    monkeypatch.setitem(tables.SHARED_MEMORY_PER_BLOCK, 90, 1024)  # nothing fits: the fallback runs
    assert tables.autotune_configs("fwd", 90, 128, 2) == [tables.FALLBACK_CONFIGS["fwd"]]


def test_parses_ptxas_reports_and_cuobjdump_listings():
    log = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'attn_fwd_kernel' for 'sm_90a'
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to ...
ptxas info    : Function properties for attn_fwd_kernel
    312 bytes stack frame, 464 bytes spill stores, 420 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 312 bytes cumulative stack size
"""
    usage = resources.parse_ptxas_log(log)
    assert (usage.registers, usage.stack_bytes, usage.spill_stores, usage.spill_loads) == (255, 312, 464, 420)
    assert len(usage.notes) == 1 and usage.notes[0].startswith("(C7515) Potential Performance Loss")
    assert resources.parse_ptxas_log("no report here") is None

    listing = """
Fatbin elf code:
================
arch = sm_80
identifier = layer_norm_cuda.cu

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _Z3fooPf:
  REG:56 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:440 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3barPf:
  REG:72 STACK:16 SHARED:2048 LOCAL:8 CONSTANT[0]:440 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    (arch_a, name_a, foo), (_arch_b, _name_b, bar) = resources.parse_cuobjdump(listing)
    assert (arch_a, name_a, foo.registers, foo.stack_bytes) == ("sm_80", "_Z3fooPf", 56, 0)
    assert (bar.registers, bar.stack_bytes, bar.spill_stores, bar.shared_bytes) == (72, 16, 16, 2048)
    ok, bad = (resources.CudaRow("sm_80", "k", usage) for usage in (foo, bar))
    assert not ok.problems and len(bad.problems) == 2
    name = "void fastvit::(anonymous namespace)::ln_kernel<c10::BFloat16, float, 8>(c10::BFloat16 const*, long)"
    assert resources._short_kernel_name(name) == "ln_kernel<bf16, float, 8>"


def test_verdicts_fail_launchable_16_bit_spills_and_any_shared_memory_overflow():
    def row(dtype, picked, spill=0, shared=1024):
        launch = resources.Launch("attention.fwd", "D=64", dtype, "(64, 64, 4, 3)", picked, "attention", "f", (), ())
        usage = resources.Usage(registers=255, stack_bytes=spill, spill_stores=spill, spill_loads=spill,
                                shared_bytes=shared)  # fmt: skip
        return resources.Row(launch, "sm_90a", usage)

    too_big = 228 * 1024  # over sm_90's 227 KiB
    assert row("bf16", True, spill=8).failing and row("fp16", True, shared=too_big).failing
    assert not row("fp32", True, spill=8).failing and row("fp32", True, spill=8).problems  # reported, accepted
    assert row("fp32", True, shared=too_big).failing  # would not launch at all
    assert not row("bf16", False, spill=8, shared=too_big).failing  # a table entry never launched here
    assert not row("bf16", True).problems
    rows = [row("bf16", True), row("fp32", True, spill=8), row("bf16", False, spill=8)]
    assert resources.failures(rows) == []
    text = resources.render(rows, [], None, markdown=True)
    assert "| ok |" in text and "| fp32, accepted: spills 8 B" in text and "| not launched: spills 8 B" in text
    assert "0 failing" in text and "1 table entries never launched" in text


def test_cuda_kernels_do_not_spill_and_stay_within_64_registers():
    rows, reason = resources.cuda_rows_or_reason(list(resources.ARCHS))
    if reason is not None:
        pytest.skip(reason)
    print(resources.render([], rows, None, markdown=False))
    archs = {row.arch for row in rows}
    assert archs == {"sm_80", "sm_90a"}, f"fastvit._C holds CUDA code for {archs}; the default build has both"
    problems = resources.failures([], rows)
    assert not problems, "\n".join(problems)


def test_cli_writes_the_markdown_table(tmp_path):
    # The Triton part is the test above; here the CLI end to end on the (fast) extension part.
    out = tmp_path / "resources.md"
    command = [sys.executable, "-m", "fastvit.kernels.resources", "--no-triton", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    assert text.startswith("# fastvit kernel resources") and "## CUDA kernels (fastvit._C)" in text
    assert "Summary" in result.stdout


def test_the_register_cap_spares_only_float64_instantiations():
    heavy = resources.Usage(registers=72, stack_bytes=0, spill_stores=0, spill_loads=0, shared_bytes=0)
    assert resources.CudaRow("sm_80", "layer_norm_bwd_dx_kernel<double, double, 1>", heavy).problems == []
    assert resources.CudaRow("sm_80", "layer_norm_bwd_dx_kernel<float, float, 4>", heavy).problems == [
        "72 registers > 64"
    ]
    spilling = dataclasses.replace(heavy, stack_bytes=16, spill_stores=8)
    assert resources.CudaRow("sm_80", "layer_norm_bwd_dx_kernel<double, double, 1>", spilling).problems
