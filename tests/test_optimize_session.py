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
    with pytest.raises(ValueError, match="scale_attn_norm"):
        fastvit.optimize(TimmViT(**TINY, scale_attn_norm=True))
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


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        # batch_sizes: one positive int or a non-empty sequence of them (issue 22: 2.0 said "'float' object is not
        # iterable")
        (dict(batch_sizes=2.0), ValueError, r"batch_sizes must be positive ints .*got 2\.0 \(float\)"),
        (dict(batch_sizes=float("nan")), ValueError, r"batch_sizes must be positive ints .*got nan \(float\)"),
        (dict(batch_sizes=True), ValueError, r"batch_sizes must be positive ints .*got True \(bool\)"),
        (dict(batch_sizes=None), ValueError, r"batch_sizes must be positive ints .*got None \(NoneType\)"),
        (dict(batch_sizes="12"), ValueError, r"batch_sizes must be positive ints .*got '12' \(str\)"),
        (dict(batch_sizes=torch.tensor(2)), ValueError, r"batch_sizes must be positive ints .*\(Tensor\)"),
        (dict(batch_sizes=[]), ValueError, r"batch_sizes must be positive ints .*got an empty list"),
        (dict(batch_sizes=-3), ValueError, r"batch_sizes must be positive ints .*got -3 \(int\)"),
        (dict(batch_sizes=[1, 2.0]), ValueError, r"got batch_sizes\[1\] = 2\.0 \(float\)"),
        (dict(batch_sizes=(4, 0)), ValueError, r"got batch_sizes\[1\] = 0 \(int\)"),
        (dict(batch_sizes=[1, None]), ValueError, r"got batch_sizes\[1\] = None"),
        # the other arguments
        (dict(warmup=2.0), ValueError, r"warmup must be an int >= 1 .*got 2\.0 \(float\)"),
        (dict(warmup=True), ValueError, r"warmup must be an int >= 1 .*got True \(bool\)"),
        (dict(input_shape=224), ValueError, r"input_shape must be \(C, H, W\) of positive ints, got 224 \(int\)"),
        (dict(input_shape="3x32x32"), ValueError, r"input_shape must be \(C, H, W\) .*got '3x32x32' \(str\)"),
        (dict(input_shape=(3, 32.0, 32)), ValueError, r"input_shape must be \(C, H, W\) of positive ints"),
        (dict(input_shape=(3, 32, 0)), ValueError, r"input_shape must be \(C, H, W\) of positive ints"),
        (dict(use_cuda_graphs="yes"), TypeError, r"use_cuda_graphs must be True, False or None .*got 'yes' \(str\)"),
        (dict(use_cuda_graphs=1), TypeError, r"use_cuda_graphs must be True, False or None"),
        (dict(dtype=None), TypeError, r"dtype must be torch\.bfloat16, torch\.float16 or torch\.float32"),
    ],
)
def test_inference_session_names_the_bad_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvit.InferenceSession(fastvit.ViT(**TINY), **kwargs)


def test_inference_session_accepts_integer_like_sizes_and_sequences():
    np = pytest.importorskip("numpy")
    model = fastvit.ViT(**TINY)
    for batch_sizes, expected in [(np.int64(2), 2), (range(1, 3), 2), ((4, 4), 4)]:
        session = fastvit.InferenceSession(model, batch_sizes=batch_sizes, dtype=torch.float32, warmup=np.int32(1))
        assert session.warmup == 1 and type(session.warmup) is int
        x = torch.randn(expected, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(session(x), model(x), rtol=0, atol=0)
    session = fastvit.InferenceSession(model, input_shape=[3, 32, 32], dtype=torch.float32)
    assert session.input_shape == (3, 32, 32)


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


@needs_cuda
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_graph_of_a_model_off_the_current_device():
    # Model on cuda:1 while cuda:0 is current: capture and replay must target the model's device and stream, else
    # the kernels run eagerly during "capture" and every replay returns the first input's (stale) output.
    model = fastvit.create_model("vit_tiny_patch16_224", depth=2).to("cuda:1")
    with torch.cuda.device(0):
        session = fastvit.InferenceSession(model, batch_sizes=[2], dtype=torch.bfloat16)
        for _ in range(3):
            x = torch.randn(2, 3, 224, 224, device="cuda:1")
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                expected = model(x)
            assert torch.equal(session(x), expected)
    assert session.replays == 3
