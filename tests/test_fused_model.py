"""The whole model on fused kernels equals the reference model, forward and backward (CPU: interpreter + C++).

On this machine the Triton kernels (patch embedding, attention) run in Triton's interpreter and the
extension's ops (LayerNorm, LN-MLP) run their C++ CPU implementations, selected per op with
``set_backend({...})``; on a GPU the same test runs the real kernels through ``backend='auto'``.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

import fastvit

from utils import DEVICE, FUSED, TINY, dtype_tols, needs_cuda, triton_skip_reason

if triton_skip_reason() is not None:
    pytest.skip(triton_skip_reason(), allow_module_level=True)
if os.environ.get("FASTVIT_NO_EXT") == "1":
    pytest.skip("FASTVIT_NO_EXT=1: the extension's ops are not built", allow_module_level=True)


def _pair(**options):
    reference = fastvit.ViT(**{**TINY, **options}, backend="torch").to(DEVICE)
    fused = copy.deepcopy(reference).set_backend(FUSED if DEVICE.type == "cpu" else "auto")
    return reference, fused


def _run(model, x, weight):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    (logits * weight).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "options",
    [dict(), dict(init_values=0.1, reg_tokens=2, global_pool="avg"), dict(no_embed_class=True, qkv_bias=False)],
    ids=["default", "layerscale-reg-avg", "no_embed_class-no_qkv_bias"],
)
def test_fused_model_equals_reference(options):
    reference, fused = _pair(**options)
    plan = fused.backend_plan(DEVICE)
    # ln_linear (the qkv GEMM with its LayerNorm prologue): 'auto' takes the Triton GEMM only where
    # fastvit/gemm_choices.json holds a measured win, else LayerNorm + cuBLAS; on CPU FUSED forces it.
    assert DEVICE.type == "cuda" or plan["ln_linear"] == "triton"
    assert {backend for op, backend in plan.items() if op != "ln_linear"} <= {"triton", "cuda"}
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    weight = torch.randn(2, 5, device=DEVICE)
    ref_logits, ref_grads = _run(reference, x, weight)
    logits, grads = _run(fused, x, weight)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_the_qkv_gemm_takes_the_block_norm_as_its_prologue_where_that_is_fused(monkeypatch):
    """Each block's norm1 + qkv is one ``ops.ln_linear`` call where its backend is a fused GEMM (CPU: FUSED forces
    the Triton GEMM; GPU 'auto': only with a measured win), else the norm module then the Linear; a hook on norm1
    makes the block call the module (the hook fires)."""
    reference, fused = _pair()
    depth, prologue = TINY["depth"], fused.backend_plan(DEVICE)["ln_linear"] != "torch"
    calls, real = [], fastvit.ops.ln_linear
    monkeypatch.setattr(fastvit.ops, "ln_linear", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), atol=1e-5, rtol=1e-4)
        assert len(calls) == (depth if prologue else 0)
        calls.clear()
        hooked = []
        fused.blocks[0].norm1.register_forward_hook(lambda *args: hooked.append(1))
        fused(x)
    assert hooked == [1] and len(calls) == (depth - 1 if prologue else 0)


def test_fused_model_with_grad_checkpointing():
    reference, fused = _pair()
    fused.set_grad_checkpointing(True)
    x, weight = torch.randn(2, 3, 16, 16, device=DEVICE), torch.randn(2, 5, device=DEVICE)
    ref_logits, ref_grads = _run(reference, x, weight)
    logits, grads = _run(fused, x, weight)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4)


def test_fused_model_compiles_fullgraph():
    reference, fused = _pair()
    x = torch.randn(2, 3, 16, 16, device=DEVICE, requires_grad=False)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x), reference(x), atol=1e-5, rtol=1e-4)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_per_op_backend_dict_is_validated():
    model = fastvit.ViT(**TINY)
    with pytest.raises(ValueError, match="unknown op"):
        model.set_backend({"softmax": "triton"})
    with pytest.raises(ValueError, match="backend 'triton' does not implement layer_norm"):
        model.set_backend({"layer_norm": "triton"})
    model.set_backend({"qkv_attention": "torch"})
    assert model.blocks[0].attn.backend == "torch" and model.blocks[0].norm1.backend is None


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224"])
def test_fused_vs_reference_on_gpu(name, dtype):
    from utils import assert_within_torch_error

    torch.manual_seed(0)
    reference = fastvit.create_model(name, depth=4).cuda()
    fused = copy.deepcopy(reference).set_backend("auto")
    reference.set_backend("torch")
    exact = copy.deepcopy(reference).double()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        ours, torch_same = fused(x).float(), reference(x).float()
    assert_within_torch_error(f"{name} logits {dtype}", ours, torch_same, exact(x.double()))


@needs_cuda
@pytest.mark.gpu
def test_fused_training_follows_the_reference_loss_curve():
    # bf16 autocast, 200 AdamW steps on the digits: the fused model's losses track the reference's.
    from fastvit.data import build_data

    data = build_data("digits", 32, shift=0)
    images = torch.stack([data.train[i][0] for i in range(len(data.train))]).cuda()
    labels = torch.stack([data.train[i][1] for i in range(len(data.train))]).cuda()
    torch.manual_seed(0)
    reference = fastvit.create_model("vit_digits_patch4_32", embed_dim=128, num_heads=4).cuda().set_backend("torch")
    fused = copy.deepcopy(reference).set_backend("auto")
    curves = {}
    for label, model in (("reference", reference), ("fused", fused)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator(device="cuda").manual_seed(0)
        losses = []
        for _ in range(200):
            idx = torch.randint(0, len(labels), (64,), device="cuda", generator=generator)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[label] = torch.tensor(losses)
    gap = (curves["fused"] - curves["reference"]).abs()
    print(
        f"max |loss gap| {gap.max():.4f}, mean {gap.mean():.4f}, final losses {curves['fused'][-1]:.4f} "
        f"vs {curves['reference'][-1]:.4f}"
    )
    assert gap[:20].max() < 0.02  # early steps: bf16 rounding only
    assert gap.mean() < 0.05 and abs(curves["fused"][-20:].mean() - curves["reference"][-20:].mean()) < 0.05


# ------------------------------------------------------------------------------------------------
# Which halves run fused: the ops called, model.fusion_report(), the debug log


def test_fused_blocks_run_one_linear_residual_and_one_ln_mlp_each(monkeypatch):
    _, fused = _pair()
    calls = {"linear_residual": 0, "ln_mlp": 0}
    for op in calls:
        original = fastvit.dispatch._REGISTRY[op]["cuda"]

        def counting(*args, _op=op, _original=original.fn):
            calls[_op] += 1
            return _original(*args)

        monkeypatch.setitem(fastvit.dispatch._REGISTRY[op], "cuda", dataclasses.replace(original, fn=counting))
    fused(torch.randn(2, 3, 16, 16, device=DEVICE))
    assert calls == {"linear_residual": 2, "ln_mlp": 2}  # depth 2


def test_fusion_report_says_which_halves_run_fused_and_why_not():
    _, fused = _pair()
    report = fused.eval().fusion_report(DEVICE)
    assert len(report) == 2 and report.all_fused, str(report)
    qkv_gemm = fused.backend_plan(DEVICE)["ln_linear"]  # norm1 + qkv: shown, chosen by measurement on a GPU
    assert report[0]["attn"].backends == {"ln_linear": qkv_gemm, "qkv_attention": "triton", "linear_residual": "cuda"}
    assert f"block  0 attn fused (ln_linear={qkv_gemm}, qkv_attention=triton, linear_residual=cuda)" in str(report)
    assert report.embed.fused and str(report).splitlines()[0] == "patch_embed    fused (patch_embed=triton)"
    assert len(str(report).splitlines()) == 1 + 2 * 2  # the patch embedding, then two halves per block

    _, layer_scaled = _pair(init_values=0.1)
    status = layer_scaled.fusion_report(DEVICE)[1]
    # LayerScale is folded: ls1 into proj (ops.linear_residual), ls2 into fc2 (ops.ln_mlp)
    assert status["attn"].fused and status["mlp"].fused, str(status)
    layer_scaled.blocks[1].ls1.register_forward_hook(lambda *args: None)
    status = layer_scaled.fusion_report(DEVICE)[1]
    assert not status["attn"].fused and "ls1 is a LayerScale with hooks" in str(status["attn"])

    _, drop_path = _pair(drop_path_rate=0.1, proj_drop_rate=0.1)
    training = drop_path.train().fusion_report(DEVICE)[1]
    assert "drop_path1 is active while training" in " ".join(training["attn"].why_not)
    assert "attn.proj_drop is active" in " ".join(training["attn"].why_not)
    assert "MLP dropout is active" in " ".join(training["mlp"].why_not)
    assert drop_path.eval().fusion_report(DEVICE).all_fused  # inactive in eval: an inference model runs fused

    reference = fastvit.ViT(**TINY, backend="torch")
    assert "qkv_attention: backend 'torch' was asked for" in str(reference.fusion_report("cpu"))
    auto = fastvit.ViT(**TINY, backend="auto").fusion_report("cpu")
    assert "'auto' runs the torch backend on cpu tensors" in str(auto)
    wide_heads = fastvit.ViT(**{**TINY, "num_heads": 4}).set_backend(FUSED).fusion_report("cpu")  # head dim 16
    assert (
        "the Triton kernels take head_dim in (32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128), got head_dim=16"
        in str(wide_heads)
    )
    if not torch.cuda.is_available():
        gpu_plan = fused.fusion_report("cuda")
        assert gpu_plan[0]["attn"].backends["linear_residual"] == "unusable"


def test_torch_layernorms_kept_in_fp32_in_a_half_model_run_as_modules():
    # Mixed-precision recipes keep norms in fp32: torch's LayerNorm takes fp32 parameters on fp16 input, the fused
    # ops do not outside autocast. Such norms are called as modules (norm1 before the qkv GEMM, norm2 before the MLP)
    # instead of the fused op refusing the mix with a TypeError.
    reference, fused = _pair()
    for model in (reference, fused):
        model.half().eval()
        for block in model.blocks:
            for name in ("norm1", "norm2"):
                half = getattr(block, name)
                kept = torch.nn.LayerNorm(half.normalized_shape, eps=half.eps).to(DEVICE)
                kept.load_state_dict({key: value.float() for key, value in half.state_dict().items()})
                setattr(block, name, kept)
    report = fused.fusion_report(DEVICE, torch.float16)
    assert "the norm's parameters are float32, the GEMM's weight float16" in str(report[0]["mlp"]), str(report)
    assert "ln_linear" not in report[0]["attn"].backends, str(report)  # norm1 runs, then the qkv Linear
    x = torch.randn(2, 3, 16, 16, device=DEVICE, dtype=torch.float16)
    torch.testing.assert_close(fused(x), reference(x), **dtype_tols(torch.float16))


def test_training_with_drop_path_equals_the_reference():
    reference, fused = _pair(drop_path_rate=0.3)
    reference.train(), fused.train()
    x, weight = torch.randn(4, 3, 16, 16, device=DEVICE), torch.randn(4, 5, device=DEVICE)
    torch.manual_seed(3)
    ref_logits, ref_grads = _run(reference, x, weight)
    torch.manual_seed(3)
    logits, grads = _run(fused, x, weight)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_debug_log_names_unfused_halves_and_fullgraph_compile_still_works(caplog):
    import logging

    reference, layer_scaled = _pair(init_values=0.1)
    for block in layer_scaled.blocks:  # a hooked LayerScale is called: the attention half runs unfused
        block.ls1.register_forward_hook(lambda *args: None)
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    with caplog.at_level(logging.DEBUG, logger="fastvit"):
        eager = layer_scaled(x)
        assert "Block: attention half unfused: ls1 is a LayerScale with hooks" in caplog.text
        assert "Block: MLP half unfused" not in caplog.text  # LayerScale is folded into ops.ln_mlp's fc2
        caplog.clear()
        # The logging calls sit behind torch.compiler.is_compiling(): no graph break under fullgraph. Earlier tests'
        # compiles of Block.forward count towards dynamo's recompile limit (a hard error under fullgraph): reset.
        torch._dynamo.reset()
        compiled = torch.compile(
            layer_scaled, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor"
        )
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(eager, reference(x), atol=1e-5, rtol=1e-4)
