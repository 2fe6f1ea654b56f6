"""Public ops: backend dispatch rules and argument validation (CPU, torch backend)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastvit
from fastvit import dispatch, ops, reference


@pytest.fixture
def restore_default_backend():
    saved = dispatch._default_backend
    yield
    dispatch._default_backend = saved


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


# ------------------------------------------------------------------------------------------------
# Dispatch


def test_auto_on_cpu_is_the_reference():
    for op in ("attention", "qkv_attention", "patch_embed", "ln_mlp", "layer_norm"):
        assert dispatch.resolve(op, "auto", torch.device("cpu")) == "torch"


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.qkv_attention(torch.randn(1, 4, 12), 2, backend="cudnn")


def test_backend_without_the_op_is_a_clear_error():
    x = torch.randn(2, 6)  # ln_mlp has no Triton implementation (torch and cuda only)
    with pytest.raises(ValueError, match="the 'triton' backend does not implement this op; implemented by: .*torch"):
        ops.ln_mlp(x, torch.ones(6), torch.zeros(6), torch.randn(9, 6), None, torch.randn(6, 9), None, backend="triton")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(dispatch._REGISTRY["layer_norm"], "triton", dispatch.Implementation(lambda *a: None))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("layer_norm", "triton", torch.device("cpu"))


def test_fused_backend_on_cuda_tensors_without_gpu_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dispatch.resolve("layer_norm", "cuda", torch.device("cuda"))


def test_set_default_backend(restore_default_backend):
    fastvit.set_default_backend("torch")
    assert fastvit.get_default_backend() == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        fastvit.set_default_backend("fast")


def test_env_default_backend_is_read_and_validated():
    ok = _run_python("import fastvit; print(fastvit.get_default_backend())", FASTVIT_BACKEND="torch")
    assert ok.returncode == 0 and ok.stdout.strip() == "torch", ok.stderr
    bad = _run_python(
        "import fastvit, torch; fastvit.ops.layer_norm(torch.ones(2, 2), torch.ones(2), torch.ones(2))",
        FASTVIT_BACKEND="nope",
    )
    assert bad.returncode != 0 and "FASTVIT_BACKEND must be one of" in bad.stderr


def test_backends_report_lists_every_backend_with_reasons():
    report = fastvit.backends()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"].available and "qkv_attention" in report["torch"].ops
    for info in report.values():
        assert info.reason and str(info)


def test_import_without_extension_still_works():
    # Simulate a machine where fastvit._C is missing: import must succeed and backends() must say why.
    code = (
        "import sys; sys.modules['fastvit._C'] = None\n"
        "import fastvit, torch\n"
        "r = fastvit.backends()['cuda']\n"
        "assert not r.available and 'not built' in r.reason, r\n"
        "m = fastvit.create_model('vit_tiny_patch16_224', depth=1, img_size=32, num_classes=3)\n"
        "print(m(torch.randn(1, 3, 32, 32)).shape)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 3])" in result.stdout


def test_fastvit_no_ext_disables_the_extension():
    result = _run_python("import fastvit; print(fastvit.backends()['cuda'].reason)", FASTVIT_NO_EXT="1")
    assert result.returncode == 0 and "FASTVIT_NO_EXT=1" in result.stdout, result.stderr


# ------------------------------------------------------------------------------------------------
# Torch backend = reference, on awkward views and sizes


@pytest.mark.parametrize("tokens", [1, 7, 50, 197])
def test_qkv_attention_on_non_contiguous_view(tokens):
    big = torch.randn(2, tokens, 3 * 32 + 5)
    qkv = big[..., 5:]  # strided view
    out = ops.qkv_attention(qkv, num_heads=4)
    torch.testing.assert_close(out, reference.qkv_attention(qkv.contiguous(), 4))


def test_ops_handle_empty_batch():
    assert ops.qkv_attention(torch.randn(0, 5, 24), 2).shape == (0, 5, 8)
    assert ops.attention(*(torch.randn(0, 2, 5, 4) for _ in range(3))).shape == (0, 2, 5, 4)
    x = torch.randn(0, 3, 8, 8)
    assert ops.patch_embed(x, torch.randn(6, 3, 4, 4), torch.randn(6)).shape == (0, 4, 6)
    x = torch.randn(0, 7, 6)
    assert (
        ops.ln_mlp(x, torch.ones(6), torch.zeros(6), torch.randn(9, 6), None, torch.randn(6, 9), None).shape == x.shape
    )


def test_patch_embed_channels_last_equals_contiguous():
    x = torch.randn(2, 3, 16, 16)
    weight, bias = torch.randn(8, 3, 4, 4), torch.randn(8)
    torch.testing.assert_close(
        ops.patch_embed(x.to(memory_format=torch.channels_last), weight, bias), ops.patch_embed(x, weight, bias)
    )


def test_attention_dropout_only_on_the_reference():
    qkv = torch.randn(1, 5, 12)
    out = ops.qkv_attention(qkv, 2, dropout_p=0.5)  # auto -> torch when dropout is on
    assert out.shape == (1, 5, 4)
    with pytest.raises(ValueError, match=r"dropout \(dropout_p > 0\) is implemented only by the 'torch' backend"):
        ops.qkv_attention(qkv, 2, dropout_p=0.5, backend="triton")


# ------------------------------------------------------------------------------------------------
# Bad input: every op names the argument and what it expected

QKV = torch.randn(2, 5, 24)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.qkv_attention(QKV[0], 2), ValueError, "qkv must have 3 dimensions"),
        (lambda: ops.qkv_attention(QKV.long(), 2), TypeError, "qkv must be a floating-point tensor"),
        (lambda: ops.qkv_attention(QKV.numpy(), 2), TypeError, "qkv must be a torch.Tensor"),
        (lambda: ops.qkv_attention(QKV, 5), ValueError, "not divisible by 3 \\* num_heads = 15"),
        (lambda: ops.qkv_attention(QKV, 0), ValueError, "num_heads must be a positive int"),
        (lambda: ops.qkv_attention(QKV, 2.0), ValueError, "num_heads must be a positive int"),
        (lambda: ops.qkv_attention(QKV, 2, scale=-1.0), ValueError, "scale must be None or a positive"),
        (lambda: ops.qkv_attention(QKV, 2, dropout_p=1.0), ValueError, "dropout_p must be a number in"),
        (
            lambda: ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).half(), torch.randn(1, 2, 3, 4)),
            TypeError,
            "one dtype",
        ),
        (
            lambda: ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 4)),
            ValueError,
            "head dim",
        ),
        (
            lambda: ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4)),
            ValueError,
            "share batch and head",
        ),
        (
            lambda: ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 6, 4)),
            ValueError,
            "as many tokens as k",
        ),
        (
            lambda: ops.attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)),
            ValueError,
            "q must have 4 dimensions",
        ),
        (
            lambda: ops.patch_embed(torch.randn(1, 3, 30, 32), torch.randn(8, 3, 4, 4), None),
            ValueError,
            "image size 30x32 is not divisible by the patch size 4x4",
        ),
        (
            lambda: ops.patch_embed(torch.randn(1, 1, 32, 32), torch.randn(8, 3, 4, 4), None),
            ValueError,
            "x must have 3 channels",
        ),
        (
            lambda: ops.patch_embed(torch.randn(3, 32, 32), torch.randn(8, 3, 4, 4), None),
            ValueError,
            "x must have 4 dimensions",
        ),
        (
            lambda: ops.patch_embed(torch.randint(0, 255, (1, 3, 8, 8)), torch.randn(8, 3, 4, 4), None),
            TypeError,
            "x must be a floating-point tensor",
        ),
        (
            lambda: ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 4, 4), torch.randn(7)),
            ValueError,
            "bias must have shape \\(8,\\)",
        ),
        (
            lambda: ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 4, 4), None, torch.randn(1, 9, 8)),
            ValueError,
            "pos_embed must have shape \\[1, 4, 8\\]",
        ),
        (
            lambda: ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 4, 4), None, None, torch.randn(1, 1, 7)),
            ValueError,
            "cls_token must have shape",
        ),
        (
            lambda: ops.ln_mlp(
                torch.randn(2, 6), torch.ones(5), torch.zeros(6), torch.randn(9, 6), None, torch.randn(6, 9), None
            ),
            ValueError,
            "ln_weight must have shape",
        ),
        (
            lambda: ops.ln_mlp(
                torch.randn(2, 6), torch.ones(6), torch.zeros(6), torch.randn(9, 6), None, torch.randn(6, 8), None
            ),
            ValueError,
            "fc2_weight must have shape",
        ),
        (
            lambda: ops.ln_mlp(
                torch.randn(2, 6),
                torch.ones(6),
                torch.zeros(6),
                torch.randn(9, 6),
                torch.randn(8),
                torch.randn(6, 9),
                None,
            ),
            ValueError,
            "fc1_bias must have shape",
        ),
        (
            lambda: ops.ln_mlp(
                torch.randn(2, 6),
                torch.ones(6),
                torch.zeros(6),
                torch.randn(9, 6),
                None,
                torch.randn(6, 9),
                None,
                approximate="fast",
            ),
            ValueError,
            "approximate must be one of",
        ),
        (
            lambda: ops.ln_mlp(
                torch.randn(2, 6),
                torch.ones(6),
                torch.zeros(6),
                torch.randn(9, 6),
                None,
                torch.randn(6, 9),
                None,
                eps=-1,
            ),
            ValueError,
            "eps must be a positive finite number",
        ),
        (
            lambda: ops.layer_norm(torch.randn(2, 6), torch.ones(6), torch.zeros(5)),
            ValueError,
            "bias must have shape \\(6,\\)",
        ),
        (
            lambda: ops.layer_norm(torch.randn(2, 6), torch.ones(6, 1), torch.zeros(6)),
            ValueError,
            "weight must have 1 dimensions",
        ),
    ],
)
def test_bad_op_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mixed_devices_are_rejected():
    # The meta device stands in for a second device on a machine without a GPU.
    with pytest.raises(ValueError, match="one device, got x on cpu, weight on meta"):
        ops.layer_norm(torch.randn(2, 6), torch.ones(6, device="meta"), torch.zeros(6))
    with pytest.raises(ValueError, match="one device"):
        ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(8, 3, 4, 4), None, torch.randn(1, 4, 8, device="meta"))


def test_deterministic_flag_and_torch_setting():
    assert not fastvit.deterministic_enabled()
    fastvit.set_deterministic(True)
    try:
        assert fastvit.deterministic_enabled()
    finally:
        fastvit.set_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        assert fastvit.deterministic_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastvit.set_deterministic(1)


def test_layer_norm_and_ln_mlp_share_one_eps_rule():
    x, w, b = torch.randn(2, 6), torch.ones(6), torch.zeros(6)
    fc1, fc2 = torch.randn(9, 6), torch.randn(6, 9)
    for eps in (0, 0.0, -1e-6, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            ops.layer_norm(x, w, b, eps=eps)
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            ops.ln_mlp(x, w, b, fc1, None, fc2, None, eps=eps)
