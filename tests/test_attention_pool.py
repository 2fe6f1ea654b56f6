"""``ops.attention`` with qk-norm inside the kernels and a key-padding mask, and the attention-pooling head on it.

The attention-pooling head (``global_pool='map'``: SigLIP, PE) has one learned query per image, broadcast over the
batch (stride 0), and k/v as views of its kv Linear's output: ``ops.attention`` takes them in place, with the q/k
norms applied as the tiles load (``fastvit::attention_prologue_fwd/bwd``) and NaFlex's key-padding mask inside the
kernels. Accuracy rule as test_attention_prologue's (flash-attention's): max|ours - ref64| <= 2 x max|torch backend
same dtype - ref64| + an fp32-rounding floor, for the output and every gradient (q, the kv buffer, the norm weights).
Without a GPU the kernels run in Triton's interpreter: tiny shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_attention_prologue import FP32_FP16, _floor, _norm_params, _run

from fastvit import fusion, ops, reference
from fastvit.layers import AttentionPoolLatent, RmsNorm
from fastvit.ops import QKNorm

from op_cases import assert_compiled_gradients_equal_eager
from utils import DEVICE, assert_within_torch_error, needs_cuda, triton_skip_reason

if triton_skip_reason() is not None:
    pytest.skip(triton_skip_reason(), allow_module_level=True)

HEADS, HEAD_DIM = 2, 32


def _inputs(batch, tokens, dtype, seed=0, heads=HEADS, head_dim=HEAD_DIM):
    """The pool's operands: the latent query [1, H, 1, D] and the kv buffer [B, N, 2·H·D]."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, heads, 1, head_dim, generator=gen)
    kv = torch.randn(batch, tokens, 2 * heads * head_dim, generator=gen)
    return latent.to(device=DEVICE, dtype=dtype), kv.to(device=DEVICE, dtype=dtype)


def _views(latent, kv):
    """q broadcast over the batch (stride 0) and k, v as [B, H, N, D] views of the kv buffer, as the pool makes them."""
    heads, head_dim = latent.shape[1], latent.shape[-1]
    k, v = kv.unflatten(-1, (2, heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
    return latent.expand(kv.shape[0], -1, -1, -1), k, v


def _mask(batch, tokens, seed=3):
    """[B, N] keep mask: holes, trailing padding, and (batch >= 2) one entry with every key masked."""
    keep = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(seed)) > 0.3
    keep[0, tokens // 2 :] = False
    if batch >= 2:
        keep[1] = False
    return keep.to(DEVICE)


def _attend(fn, kinds, mask, dtype):
    """fn(latent, kv, *norm params) -> [B, H, 1, D]: ``fn`` is ops.attention with a backend or the spec."""
    q_kind, k_kind = kinds
    n_q = {None: 0, "rms": 1, "layer": 2}[q_kind]  # q's norm parameters come first (see _norm_params)

    def run(latent, kv, *params):
        params = [p.to(dtype) for p in params]
        q_norm = QKNorm(params[0], params[1] if n_q > 1 else None, 1e-6, q_kind) if q_kind else None
        k_params = params[n_q:]
        k_norm = QKNorm(k_params[0], k_params[1] if len(k_params) > 1 else None, 1e-5, k_kind) if k_kind else None
        return fn(*_views(latent, kv), q_norm=q_norm, k_norm=k_norm, key_padding_mask=mask)

    return run


def _spec(q, k, v, *, q_norm, k_norm, key_padding_mask):
    q, k = reference.qk_norm(q_norm)(q), reference.qk_norm(k_norm)(k)
    return reference.attention(q, k, v, key_padding_mask=key_padding_mask)


def _check(batch, tokens, kinds, masked, dtype, name="", heads=HEADS, head_dim=HEAD_DIM):
    latent, kv = _inputs(batch, tokens, dtype, heads=heads, head_dim=head_dim)
    mask = _mask(batch, tokens) if masked else None
    params = [*_norm_params(kinds[0], head_dim, 1), *_norm_params(kinds[1], head_dim, 2)]
    triton = lambda *a, **k: ops.attention(*a, backend="triton", **k)  # noqa: E731
    torch_path = lambda *a, **k: ops.attention(*a, backend="torch", **k)  # noqa: E731
    ours = _run(_attend(triton, kinds, mask, dtype), [latent, kv, *params])
    theirs = _run(_attend(torch_path, kinds, mask, dtype), [latent, kv, *params])
    exact = _run(_attend(_spec, kinds, mask, torch.float64), [latent.double(), kv.double(), *params])
    labels = ["out", "dlatent", "dkv"] + [f"dnorm{i}" for i in range(len(params))]
    for label, mine, torch_err, ref in zip(labels, [ours[0], *ours[1]], [theirs[0], *theirs[1]],
                                           [exact[0], *exact[1]]):  # fmt: skip
        assert mine.shape == ref.shape, (label, mine.shape, ref.shape)
        assert torch.isfinite(mine).all(), f"{name} {label}: non-finite values"
        assert_within_torch_error(f"{name} {label}", mine, torch_err, ref, floor=_floor(ref))
    return ours


KINDS = [(None, "layer"), ("rms", "rms"), ("layer", None), (None, None)]


@FP32_FP16
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding"])
@pytest.mark.parametrize("kinds", KINDS, ids=[f"q-{q}_k-{k}" for q, k in KINDS])
def test_one_broadcast_query_with_qk_norm_and_mask_matches_the_spec(kinds, masked, dtype):
    out, _ = _check(3, 37, kinds, masked, dtype, name=f"{kinds} masked={masked} {dtype}")
    if masked:  # the entry without a kept key: output 0, as the spec
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_several_queries_and_key_blocks_with_layer_norm_both_sides():
    # More than one query row and several key blocks (the interpreter's tiles are 64 wide): q not broadcast.
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, HEADS, n, HEAD_DIM, generator=gen).to(DEVICE) for n in (9, 150, 150))
    q_w, q_b = _norm_params("layer", HEAD_DIM, 1)
    k_w, k_b = _norm_params("layer", HEAD_DIM, 2)
    mask = _mask(2, 150)
    mask[1, :3] = True

    def call(fn, dtype):
        def run(q, k, v, *p):
            q_norm, k_norm = QKNorm(p[0].to(dtype), p[1].to(dtype)), QKNorm(p[2].to(dtype), p[3].to(dtype))
            return fn(q, k, v, q_norm=q_norm, k_norm=k_norm, key_padding_mask=mask)

        return run

    inputs = [q, k, v, q_w, q_b, k_w, k_b]
    ours = _run(call(lambda *a, **kw: ops.attention(*a, backend="triton", **kw), torch.float32), inputs)
    theirs = _run(call(lambda *a, **kw: ops.attention(*a, backend="torch", **kw), torch.float32), inputs)
    exact = _run(call(_spec, torch.float64), [t.double() for t in inputs])
    for label, mine, torch_err, ref in zip(range(8), [ours[0], *ours[1]], [theirs[0], *theirs[1]],
                                           [exact[0], *exact[1]]):  # fmt: skip
        assert_within_torch_error(f"output/grad {label}", mine, torch_err, ref, floor=_floor(ref))


def test_gradients_are_bit_identical_run_to_run():
    first, second = (_check(2, 40, ("rms", "layer"), True, torch.float32) for _ in range(2))
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# torch.library, torch.compile, bad inputs


def _prologue_args():
    q_w, q_b = _norm_params("layer", HEAD_DIM, 1)
    (k_w,) = _norm_params("rms", HEAD_DIM, 2)
    return [None, 0, False, "layer", q_w, q_b, 1e-6, "rms", k_w, None, 1e-5]


@pytest.mark.parametrize("op_name", ["attention_prologue_fwd", "attention_prologue_bwd", "attention_fwd"])
def test_opcheck(op_name):
    latent, kv = _inputs(2, 9, torch.float32)
    q, k, v = (t.contiguous() for t in _views(latent, kv))
    mask = _mask(2, 9)
    prologue = _prologue_args()
    out, lse = torch.ops.fastvit.attention_prologue_fwd(q, k, v, 0.2, *prologue, mask)
    if op_name == "attention_prologue_bwd":
        args = (torch.randn_like(out), q, k, v, out, lse, 0.2, *prologue, mask)
    else:
        grads = [t.clone().requires_grad_() for t in (q, k, v, prologue[4], prologue[5], prologue[8])]
        prologue[4], prologue[5], prologue[8] = grads[3:]
        args = (*grads[:3], 0.2, *prologue, mask) if op_name == "attention_prologue_fwd" else (*grads[:3], 0.2, mask)
    torch.library.opcheck(getattr(torch.ops.fastvit, op_name).default, args)


def test_torch_compile_fullgraph_with_backward():
    latent, kv = _inputs(2, 21, torch.float32)
    (k_w,) = _norm_params("rms", HEAD_DIM, 2)
    mask = _mask(2, 21)

    def step(latent, kv, w):
        out = ops.attention(*_views(latent, kv), backend="triton", k_norm=QKNorm(w, kind="rms"), key_padding_mask=mask)
        return (out * 1.5).square().sum()

    assert_compiled_gradients_equal_eager(step, [latent, kv, k_w])


def _bad_cases():
    q, k, v = (torch.randn(2, HEADS, n, HEAD_DIM, device=DEVICE) for n in (1, 5, 5))
    weight = torch.ones(HEAD_DIM, device=DEVICE)
    return [
        (dict(key_padding_mask=torch.ones(2, 1, dtype=torch.bool, device=DEVICE)), ValueError,
         r"key_padding_mask must be \[B, N\] = \[2, 5\] \(q's batch, k's tokens\)"),
        (dict(key_padding_mask=torch.ones(2, 5, device=DEVICE)), TypeError, "key_padding_mask must be a bool tensor"),
        (dict(key_padding_mask=[[True] * 5] * 2), TypeError, "key_padding_mask must be a torch.Tensor"),
        (dict(k_norm=QKNorm(torch.ones(HEAD_DIM + 1, device=DEVICE))), ValueError, r"k_norm.weight must have shape"),
        (dict(q_norm=weight), TypeError, "q_norm must be a fastvit.ops.QKNorm"),
        (dict(q_norm=QKNorm(weight, weight, kind="rms")), ValueError, "q_norm.bias must be None for kind='rms'"),
        (dict(k_norm=QKNorm(weight, eps=0.0)), ValueError, "k_norm.eps must be a positive finite number"),
    ], (q, k, v)  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_inputs_are_clear_errors(case):
    cases, (q, k, v) = _bad_cases()
    kwargs, error, match = cases[case]
    for backend in ("torch", "triton"):
        with pytest.raises(error, match=match):
            ops.attention(q, k, v, backend=backend, **kwargs)


# ------------------------------------------------------------------------------------------------
# The attention-pooling head


def _pool(qk_norm: bool, norm_layer=None) -> AttentionPoolLatent:
    torch.manual_seed(0)
    pool = AttentionPoolLatent(HEADS * HEAD_DIM, num_heads=HEADS, mlp_ratio=2.0, qk_norm=qk_norm, norm_layer=norm_layer)
    with torch.no_grad():
        for param in pool.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return pool.to(DEVICE)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding"])
@pytest.mark.parametrize("norm_layer", [None, RmsNorm], ids=["layer-norm", "rms-norm"])
def test_pool_on_the_kernels_matches_the_spec(norm_layer, masked):
    pool = _pool(True, norm_layer)
    x = torch.randn(3, 11, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = _mask(3, 11) if masked else None

    def run(backend, dtype):
        module = copy.deepcopy(pool).to(dtype)
        module.backend = backend
        inputs = [x.detach().to(dtype).requires_grad_(True), *module.parameters()]
        out = module(inputs[0], mask)
        return module, out, torch.autograd.grad(out.square().sum(), inputs)

    _, got, got_grads = run("triton", torch.float32)
    _, torch_out, torch_grads = run("torch", torch.float32)
    exact_pool, exact, exact_grads = run("torch", torch.float64)
    names = ["x", *dict(pool.named_parameters())]
    for name, mine, theirs, ref in zip(["out", *names], [got, *got_grads], [torch_out, *torch_grads],
                                       [exact, *exact_grads]):  # fmt: skip
        assert torch.isfinite(mine).all(), name
        assert_within_torch_error(f"pool {name}", mine, theirs, ref, floor=_floor(ref))

    def head_norm(module):
        kind = "rms" if isinstance(module, RmsNorm) else "layer"
        return reference.qk_norm(QKNorm(module.weight, getattr(module, "bias", None), module.eps, kind))

    p = exact_pool
    with torch.no_grad():  # the fp64 torch path is the spec, masked images included
        spec = reference.attention_pool(
            x.double(), p.latent, p.q.weight, p.q.bias, p.kv.weight, p.kv.bias, p.proj.weight, p.proj.bias, HEADS,
            norm=p.norm, mlp=lambda y: p.mlp.fc2(torch.nn.functional.gelu(p.mlp.fc1(y))),
            q_norm=head_norm(p.q_norm), k_norm=head_norm(p.k_norm), key_padding_mask=mask,
        )  # fmt: skip
    torch.testing.assert_close(exact.detach(), spec, atol=1e-12, rtol=1e-10)


def test_fusion_report_puts_the_pools_qk_norm_inside_the_kernel():
    pool = _pool(True)
    pool.backend = "triton"
    report = fusion.pool_fusion(pool, DEVICE, torch.float32)
    assert report["attn"].fused and report["attn"].backends == {"attention": "triton"}, report["attn"]
    pool.k_norm = torch.nn.GroupNorm(1, HEAD_DIM)  # not a norm the prologue computes: called as a module
    report = fusion.pool_fusion(pool, DEVICE, torch.float32)
    assert not report["attn"].fused and "attn_pool.k_norm is a GroupNorm" in report["attn"].why_not[0]


# ------------------------------------------------------------------------------------------------
# GPU: bfloat16, SigLIP-sized pools (skipped without CUDA)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding"])
@pytest.mark.parametrize(
    "heads, head_dim, kinds", [(16, 72, (None, None)), (12, 64, (None, "layer")), (16, 64, ("rms", "rms"))]
)
def test_gpu_pool_attention_siglip_sizes(heads, head_dim, kinds, masked, dtype):
    # so400m/14-384: 729 tokens, 16 heads of 72 (the head-dim pieces); a k-norm / both norms at D = 64.
    _check(8, 729, kinds, masked, dtype, name=f"gpu D={head_dim} {kinds}", heads=heads, head_dim=head_dim)
