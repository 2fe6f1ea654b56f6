"""fastvit.optimize (timm model converted in place) and fastvit.InferenceSession (CUDA-graph inference)."""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit

from utils import needs_cuda

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def test_optimize_keeps_logits_parameters_and_state_dict():
    model = TimmViT(**TINY, init_values=0.1, global_pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    params_before = {name: param for name, param in model.named_parameters()}
    keys_before = list(model.state_dict())
    assert fastvit.optimize(model) is model
    assert all(isinstance(block, fastvit.layers.Block) for block in model.blocks)
    assert isinstance(model.norm, fastvit.layers.LayerNorm) or isinstance(model.fc_norm, fastvit.layers.LayerNorm)
    assert list(model.state_dict()) == keys_before
    for name, param in model.named_parameters():
        assert param is params_before[name], f"{name} is a new tensor: an existing optimizer would lose it"
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_optimizer_built_before_optimize_still_trains_the_model():
    reference = TimmViT(**TINY)
    model = copy.deepcopy(reference)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fastvit.optimize(model)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    for net, opt in ((model, optimizer), (reference, ref_optimizer)):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_optimize_fastvit_model_sets_backend_and_rejects_unsupported():
    ours = fastvit.ViT(**TINY)
    assert fastvit.optimize(ours, backend="torch") is ours and ours.backend == "torch"
    with pytest.raises(ValueError, match="qk-norm"):
        fastvit.optimize(TimmViT(**TINY, qk_norm=True))
    with pytest.raises(TypeError, match="expects a timm VisionTransformer"):
        fastvit.optimize(torch.nn.Linear(2, 2))


def test_inference_session_on_cpu_runs_eagerly_with_autocast():
    model = fastvit.ViT(**TINY)
    session = fastvit.InferenceSession(model, batch_sizes=[1, 4], dtype=torch.bfloat16)
    assert not session.use_cuda_graphs and session.captured_batch_sizes == []
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    assert torch.equal(session(x), expected)
    assert session.fallback_calls == 1


def test_inference_session_rejects_bad_arguments():
    model = fastvit.ViT(**TINY)
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        fastvit.InferenceSession(model, use_cuda_graphs=True)
    with pytest.raises(ValueError, match="batch_sizes must be positive ints"):
        fastvit.InferenceSession(model, batch_sizes=0)
    with pytest.raises(TypeError, match="dtype must be"):
        fastvit.InferenceSession(model, dtype=torch.int8)
    session = fastvit.InferenceSession(model)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 32, 32\]"):
        session(torch.randn(1, 3, 16, 16))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_replay_equals_eager(dtype):
    model = fastvit.create_model("vit_small_patch16_224", depth=4).cuda()
    session = fastvit.InferenceSession(model, batch_sizes=[1, 8], dtype=dtype)
    assert session.captured_batch_sizes == [1, 8]
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            expected = model(x)
        assert torch.equal(session(x), expected)
    session(torch.randn(3, 3, 224, 224, device="cuda"))
    assert session.replays == 2 and session.fallback_calls == 1
