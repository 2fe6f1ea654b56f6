"""Model surgery, adapters and hooks: the fused paths run what is registered now, never a stale or bypassed module.

A fused path reads weights instead of calling modules (``ops.ln_mlp`` reads norm2/fc1/fc2, the attention half adds
the residual inside the proj GEMM, ``ops.patch_embed`` reads ``patch_embed.proj``). For every submodule a fused path
touches, the same surgery (replace, wrap with a LoRA-style adapter, hook) is applied to a timm model, which calls
every module, and to fastvit's conversion of it running every op on a fused backend (here: the Triton interpreter
and the extension's C++ twin); outputs and every gradient must agree.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit import layers
from fastvit.fusion import block_fusion

from utils import DEVICE, FUSED, TINY, has_module, triton_skip_reason

if triton_skip_reason() is not None:
    pytest.skip(triton_skip_reason(), allow_module_level=True)
if os.environ.get("FASTVIT_NO_EXT") == "1":
    pytest.skip("FASTVIT_NO_EXT=1: the extension's ops are not built", allow_module_level=True)
timm = pytest.importorskip("timm")


class LoraLinear(nn.Module):
    """A peft-style adapter: weight/bias of the wrapped Linear as properties, ``forward`` adds a low-rank delta."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.t() @ self.lora_b.t()


def _double(module, args, output):
    return output * 2.0


def _pair():
    torch.manual_seed(0)
    timm_model = timm.models.vision_transformer.VisionTransformer(**TINY).to(DEVICE)
    with torch.no_grad():  # non-trivial norms and biases, so that a skipped module shows
        for name, p in timm_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5).add_(1.0 if name.endswith("weight") else 0.0)
    fused = fastvit.from_timm(copy.deepcopy(timm_model)).set_backend(FUSED if DEVICE.type == "cpu" else "auto")
    return timm_model.eval(), fused.eval()


def _outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(timm_model, fused, x=None):
    x = torch.randn(2, 3, 16, 16, device=DEVICE) if x is None else x
    expected, expected_grads = _outputs_and_grads(timm_model, x)
    got, grads = _outputs_and_grads(fused, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert set(grads) == set(expected_grads), set(grads) ^ set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _replace(model, path, make):
    owner_path, _, leaf = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    setattr(owner, leaf, make(getattr(owner, leaf)))


SURGERIES = {
    "norm2 -> Identity": ("blocks.0.norm2", lambda old: nn.Identity()),
    "norm1 -> Identity": ("blocks.1.norm1", lambda old: nn.Identity()),
    "norm2 -> RMSNorm": ("blocks.0.norm2", lambda old: nn.RMSNorm(old.normalized_shape, eps=1e-6)),
    "mlp.act -> ReLU": ("blocks.0.mlp.act", lambda old: nn.ReLU()),
    "mlp.act -> tanh GELU": ("blocks.1.mlp.act", lambda old: nn.GELU(approximate="tanh")),
    "ls1 -> scale": ("blocks.0.ls1", lambda old: _Scale(64)),
    "ls2 -> scale": ("blocks.1.ls2", lambda old: _Scale(64)),
}
ADAPTER_TARGETS = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
HOOK_TARGETS = [
    "blocks.0.norm2",
    "blocks.0.attn.proj",
    "blocks.0.mlp.fc1",
    "blocks.0.mlp.fc2",
    "blocks.0.mlp.act",
    "blocks.1.attn",
    "blocks.1.mlp",
    "blocks.1.ls1",
    "patch_embed.proj",
]


class _Scale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.gamma


def _same_surgery(path, make):
    """Both models of a pair, with ``path`` replaced by ``make(old)`` in each (same random init for both)."""
    models = _pair()
    for model in models:
        torch.manual_seed(1)
        _replace(model, path, make)
    return models


@pytest.mark.parametrize("surgery", list(SURGERIES))
def test_replaced_submodules_are_run(surgery):
    _assert_same(*_same_surgery(*SURGERIES[surgery]))


@pytest.mark.parametrize("target", ADAPTER_TARGETS)
def test_lora_style_adapters_take_effect(target):
    timm_model, fused = _same_surgery(target, LoraLinear)
    _assert_same(timm_model, fused)
    block = fused.get_submodule(".".join(target.split(".")[:2]))
    status = block_fusion(block, DEVICE, torch.float32)
    half = "attn" if ".attn." in target else "mlp"
    if not target.endswith("qkv"):  # qkv is called by the fused path, so an adapter there keeps the half fused
        assert not status[half].fused and "LoraLinear" in " ".join(status[half].why_not)


@pytest.mark.parametrize("target", HOOK_TARGETS)
def test_forward_hooks_take_effect(target):
    timm_model, fused = _pair()
    timm_model.get_submodule(target).register_forward_hook(_double)
    fused.get_submodule(target).register_forward_hook(_double)
    _assert_same(timm_model, fused)


def test_replaced_forward_takes_effect():
    timm_model, fused = _pair()
    for model in (timm_model, fused):
        fc1 = model.blocks[0].mlp.fc1
        fc1.forward = lambda x, _fc1=fc1: nn.functional.linear(x, _fc1.weight, _fc1.bias) * 0.5
    _assert_same(timm_model, fused)


def test_global_module_hooks_turn_fusion_off():
    timm_model, fused = _pair()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        fused(torch.randn(1, 3, 16, 16, device=DEVICE))
        assert "GELU" in seen and "Linear" in seen  # every module was called
        assert not fused.fusion_report(DEVICE).all_fused
    finally:
        handle.remove()
    assert fused.fusion_report(DEVICE).all_fused


def test_fusion_report_names_the_surgery():
    _, fused = _pair()
    fused.blocks[0].norm2 = nn.Identity()
    fused.blocks[0].mlp.act = nn.ReLU()
    report = fused.fusion_report(DEVICE)
    assert not report[0]["mlp"].fused and report[1]["mlp"].fused
    why = " ".join(report[0]["mlp"].why_not)
    assert "the norm is a Identity" in why and "mlp.act is a ReLU" in why


def test_a_replaced_norm_gets_its_gradients():
    _, fused = _pair()
    fused.blocks[0].norm2 = layers.LayerNorm(64)
    fused.blocks[0].norm2.backend = "cuda"
    fused(torch.randn(2, 3, 16, 16, device=DEVICE)).sum().backward()
    assert fused.blocks[0].norm2.weight.grad is not None and fused.blocks[0].norm2.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not has_module("peft"), reason="needs peft (pip install peft)")
def test_peft_lora_on_every_target_matches_timm():
    import peft

    timm_model, fused = _pair()
    config = dict(r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"], init_lora_weights=False)
    torch.manual_seed(3)
    timm_lora = peft.get_peft_model(timm_model, peft.LoraConfig(**config))
    fused_lora = peft.get_peft_model(fused, peft.LoraConfig(**config))
    fused_lora.load_state_dict(timm_lora.state_dict())  # the same LoRA weights (nonzero B: a real delta)
    _assert_same(timm_lora, fused_lora)
    report = fused.fusion_report(DEVICE)
    assert not report[0]["attn"].fused and not report[0]["mlp"].fused  # proj/fc1/fc2 are adapters: unfused
