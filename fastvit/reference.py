"""Pure-PyTorch definitions of every fastvit op: the specification.

Every backend of every op (``torch``, ``triton``, ``cuda``) is tested against these functions, run in
fp64 for the ground truth; autograd gives their backward. They are written to be read, not to be fast
(attention materialises the N×N matrix, the patch embedding cuts patches out explicitly): the fast
plain-PyTorch forms are the ``torch`` backends in ``fastvit/ops/<op>.py``. They take the same arguments as
the public ops in ``fastvit.ops`` but do not validate them: validation lives in the op layer, once per op.

Shapes: ``B`` batch, ``N`` tokens, ``H`` heads, ``D`` head dim, ``C = H*D`` width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension. x: [..., C], weight/bias: [C]."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) over the keys, [B, H, N, M], in q's dtype (softmax in fp32 for fp16/bf16).

    The attention weights themselves: what ``attention`` multiplies v by, and what attention rollout reads.
    ``key_padding_mask``: [B, M] bool, True = the key takes part (timm NaFlexViT's ``patch_valid``, SDPA's boolean
    ``attn_mask``); masked keys get weight 0, and a batch entry without any kept key gets all-zero weights (so its
    attention output is 0, not NaN).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    if key_padding_mask is not None:  # softmax over no key is NaN: zero weights instead
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return probs.to(q.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """softmax(q kᵀ · scale) v. q, k, v: [B, H, N, D] -> [B, H, N, D].

    ``scale`` defaults to D**-0.5. The softmax runs in fp32 for fp16/bf16 inputs (the numerics rule
    of every fastvit kernel). ``dropout_p`` drops attention probabilities (training only; the
    fused kernels do not implement it). ``key_padding_mask``: [B, M] bool, see :func:`attention_probs`.
    """
    probs = attention_probs(q, k, scale, key_padding_mask)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def qkv_attention(
    qkv: torch.Tensor, num_heads: int, scale: float | None = None, dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    *, rope: torch.Tensor | None = None, num_prefix_tokens: int = 0, rope_layout: str = "interleaved",
    q_norm=None, k_norm=None,
) -> torch.Tensor:  # fmt: skip
    """Multi-head self-attention on the packed output of a qkv Linear.

    qkv: [B, N, 3*C], laid out as timm's ``reshape(B, N, 3, H, D)``; returns [B, N, C] (heads
    concatenated, ready for the proj Linear). The prologue arguments are ``fastvit.ops.qkv_attention``'s: ``q_norm``
    / ``k_norm`` (``fastvit.ops.QKNorm``: weight, bias, eps, kind 'layer' | 'rms') normalise each head vector, then
    ``rope`` ([N - num_prefix_tokens, 2·D] cat(sin, cos), or one per head [H, N - num_prefix_tokens, 2·D]) rotates
    all but the prefix tokens: :func:`qk_norm_attention`.
    ``key_padding_mask``: [B, N] bool, True = keep (see :func:`attention_probs`).
    """
    if rope is not None or q_norm is not None or k_norm is not None:
        return qk_norm_attention(
            qkv,
            num_heads,
            qk_norm(q_norm),
            qk_norm(k_norm),
            scale,
            rope,
            num_prefix_tokens,
            rope_layout == "half",
            key_padding_mask,
        )
    batch, tokens, width3 = qkv.shape
    head_dim = width3 // (3 * num_heads)
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q, k, v, scale=scale, dropout_p=dropout_p, key_padding_mask=key_padding_mask)
    return out.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


def varlen_qkv_attention(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int, scale: float | None = None,
    *, rope: torch.Tensor | None = None, num_prefix_tokens: int = 0, rope_layout: str = "interleaved",
    q_norm=None, k_norm=None,
) -> torch.Tensor:  # fmt: skip
    """Multi-head self-attention within each of B sequences packed back to back (no attention across them).

    qkv: [T, 3*C], the qkv Linear's output of every sequence's tokens in turn (timm's per-token layout);
    cu_seqlens: [B + 1] ints, sequence b is tokens ``cu_seqlens[b]:cu_seqlens[b + 1]`` (empty ones allowed).
    The prologue arguments are :func:`qkv_attention`'s, applied to each sequence alone: every sequence's first
    ``num_prefix_tokens`` tokens stay unrotated, and ``rope`` is the packed table [T - num_prefix_tokens, 2·D]
    (``fastvit.packing.packed_rope_table``) whose row ``g - num_prefix_tokens`` rotates packed token g: sequence b's
    own table is rows ``cu_seqlens[b]:cu_seqlens[b + 1] - num_prefix_tokens`` (or one such table per head,
    [H, T - num_prefix_tokens, 2·D]).
    Returns [T, C]: :func:`qkv_attention` of each sequence alone, concatenated.
    """
    bounds = cu_seqlens.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        prefix = min(num_prefix_tokens, end - start)
        table = None if rope is None else rope[..., start : max(start, end - num_prefix_tokens), :]
        parts.append(
            qkv_attention(
                qkv[None, start:end], num_heads, scale, rope=table, num_prefix_tokens=prefix if rope is not None else 0,
                rope_layout=rope_layout, q_norm=q_norm, k_norm=k_norm,
            )[0]
        )  # fmt: skip
    return torch.cat(parts) if parts else qkv[:, : qkv.shape[-1] // 3].clone()  # B = 0: T = 0


def patch_embed(
    x, weight, bias, pos_embed=None, cls_token=None, *, norm_weight=None, norm_bias=None, norm_eps=1e-6, norm="layer"
):
    """Image to token sequence: non-overlapping P×P patches projected to D dims.

    x: [B, Cin, Hin, Win] (Hin, Win divisible by P); weight: [D, Cin, P, P] (a conv kernel with
    stride P); bias: [D] or None. ``norm_weight``: [D], a norm over D applied to the projected patch
    tokens (never to the prefix tokens) before the position embedding, as timm's ``PatchEmbed(norm_layer=...)``
    followed by ``_pos_embed`` (AIMv2's RMSNorm): ``norm`` 'layer' (LayerNorm, ``norm_bias`` [D] or None) or
    'rms' (RMSNorm, ``norm_bias`` None), epsilon ``norm_eps``; None: no norm. ``cls_token``: [1, T, D] prefix
    tokens (class and/or register tokens), prepended to the N patch tokens. ``pos_embed``: [1, T+N, D] is added
    to every token (timm's default), or [1, N, D] to the patch tokens only (timm's ``no_embed_class``).
    Returns [B, T+N, D]: ``[prefix | Norm(im2col(x)·Wᵀ + b)] + pos_embed``.
    """
    batch, in_chans, height, width = x.shape
    embed_dim, _, patch_h, patch_w = weight.shape
    grid_h, grid_w = height // patch_h, width // patch_w
    # One row per patch, its pixels in the conv weight's (Cin, P, P) order: [B, N, Cin·P·P].
    patches = x.reshape(batch, in_chans, grid_h, patch_h, grid_w, patch_w).permute(0, 2, 4, 1, 3, 5)
    tokens = F.linear(patches.reshape(batch, grid_h * grid_w, -1), weight.reshape(embed_dim, -1), bias)
    if norm_weight is not None:
        tokens = _norm(tokens, norm_weight, norm_bias, norm_eps, norm)
    num_prefix = 0 if cls_token is None else cls_token.shape[1]
    if num_prefix:
        tokens = torch.cat([cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
    if pos_embed is None:
        return tokens
    if pos_embed.shape[1] == grid_h * grid_w:  # patch tokens only: nothing is added to the prefix tokens
        return torch.cat([tokens[:, :num_prefix], tokens[:, num_prefix:] + pos_embed], dim=1)
    return tokens + pos_embed


def normalize_uint8(images: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """The spec of the uint8 path's input: ``((images / 255 - mean[c]) / std[c]).to(dtype)``.

    ``images``: uint8 [B, C, H, W] (any strides). Computed in fp32 (fp64 for an fp64 ``dtype``) exactly as
    torchvision's ``Normalize`` on ``images.float() / 255``, then rounded to ``dtype``.
    """
    work = torch.promote_types(dtype, torch.float32)
    mean = torch.tensor(mean, dtype=work, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=work, device=images.device).view(1, -1, 1, 1)
    return ((images.to(work) / 255 - mean) / std).to(dtype)


def ln_mlp(
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-6, approximate="none", residual=True,
    *, act=None, norm="layer", hidden_norm_weight=None, hidden_norm_bias=None, hidden_norm_eps=None, layer_scale=None,
):  # fmt: skip
    """The MLP half of a pre-norm ViT block: ``x + layer_scale * fc2(hidden_norm(act(fc1(Norm(x)))))``.

    x: [..., C]; fc1_weight: [P, C]; fc2_weight: [C, Hid] with P = Hid, or 2·Hid for ``act='swiglu'``.
    ``act``: 'gelu' (exact erf, timm's nn.GELU), 'gelu_tanh', 'quick_gelu' (``x·σ(1.702x)``) or 'swiglu'
    (``silu(a) * b`` for fc1's output halves ``a, b``: timm's SwiGLUPacked, and timm's SwiGLU with
    ``fc1 = cat([fc1_g, fc1_x])``); None takes GELU's ``approximate`` ('none' or 'tanh'). ``norm``: 'layer'
    (LayerNorm, ``ln_bias`` may be None) or 'rms' (RMSNorm, ``ln_bias`` None). ``hidden_norm_weight``/``_bias``: an
    optional norm of the same kind over the Hid features before fc2 (timm's ``scale_mlp_norm`` / SwiGLU's sub-LN),
    eps ``hidden_norm_eps`` (default ``eps``). ``layer_scale``: [C] LayerScale gamma on fc2's output, or None.
    ``residual=False`` drops the ``x +``.
    """
    act = act or ("gelu_tanh" if approximate == "tanh" else "gelu")
    pre = F.linear(_norm(x, ln_weight, ln_bias, eps, norm), fc1_weight, fc1_bias)
    hidden = mlp_activation(pre, act)
    if hidden_norm_weight is not None:
        hidden = _norm(
            hidden, hidden_norm_weight, hidden_norm_bias, eps if hidden_norm_eps is None else hidden_norm_eps, norm
        )
    out = F.linear(hidden, fc2_weight, fc2_bias)
    if layer_scale is not None:
        out = out * layer_scale
    return x + out if residual else out


def _norm(x, weight, bias, eps, kind):
    """LayerNorm (``kind='layer'``, bias may be None) or RMSNorm (``kind='rms'``) over the last dimension."""
    return rms_norm(x, weight, eps) if kind == "rms" else F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def mlp_activation(pre: torch.Tensor, act: str) -> torch.Tensor:
    """The MLP's activation on fc1's output ``pre`` [..., P]: 'gelu', 'gelu_tanh', 'quick_gelu' ([..., P]) or
    'swiglu' (``silu(first half) * second half``, [..., P/2]: the gate is the first half, timm's SwiGLUPacked)."""
    if act == "swiglu":
        gate, value = pre.chunk(2, dim=-1)
        return F.silu(gate) * value
    if act == "quick_gelu":
        return quick_gelu(pre)
    return F.gelu(pre, approximate="tanh" if act == "gelu_tanh" else "none")


def linear_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, *,
    layer_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """A Linear layer and the residual add after it: ``residual + layer_scale * (x @ weight.T + bias)``.

    x: [..., K]; weight: [N, K]; bias: [N] or None; residual: [..., N] (x's leading shape); layer_scale: [N]
    LayerScale gamma, or None (no scaling). In a ViT block this is the attention half's ``x + ls1(proj(attn_out))``.
    """
    out = F.linear(x, weight, bias)
    return residual + (out if layer_scale is None else layer_scale * out)


def ln_linear(
    x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, weight: torch.Tensor,
    bias: torch.Tensor | None = None, eps: float = 1e-6, activation: str = "none",
    residual: torch.Tensor | None = None, *, norm: str = "layer", activation_columns: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """A Linear layer with its glue: ``act(Norm(x) @ weight.T + bias) + residual``.

    x: [..., K]; ln_weight: [K] or None (no norm); ln_bias: [K] or None (LayerNorm only); ``norm``: 'layer'
    (LayerNorm) or 'rms' (RMSNorm); weight: [N, K] ([2N, K] for 'swiglu', gate rows first); bias: [N] ([2N]) or
    None; ``activation``: 'none' or one of :func:`mlp_activation`'s; residual: [..., N] (x's leading shape) or None.
    ``activation_columns``: see :func:`activate_columns`.
    """
    hidden = x if ln_weight is None else _norm(x, ln_weight, ln_bias, eps, norm)
    out = activate_columns(F.linear(hidden, weight, bias), activation, activation_columns)
    return out if residual is None else residual + out


def activate_columns(out: torch.Tensor, activation: str, columns: int | None = None) -> torch.Tensor:
    """``activation`` on the first ``columns`` of the last dimension of ``out``, the rest left as they are (the
    parallel blocks' in_proj: the MLP's hidden columns first, then q, k, v); None: on every column."""
    if activation == "none":
        return out
    if columns is None:
        return mlp_activation(out, activation)
    return torch.cat([mlp_activation(out[..., :columns], activation), out[..., columns:]], dim=-1)


# ------------------------------------------------------------------------------------------------
# The modern families' parts (SigLIP, CLIP, DINOv2, EVA02, AIMv2, ...). The modules in ``fastvit.layers`` run them
# in plain fast PyTorch; these are the readable definitions they are tested against.


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x²) + eps) * weight``. x: [..., C], weight: [C] or None."""
    out = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return out if weight is None else out * weight


def glu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act=F.silu, gate_last=False, norm=None):
    """A gated MLP with one packed fc1 (timm's ``GluMlp``; ``SwiGLUPacked`` is ``act=silu, gate_last=False``).

    x: [..., C]; fc1_weight: [2·Hid, C], its output split in two halves ``a, b`` of Hid; the hidden layer is
    ``act(a) * b`` (``gate_last=False``) or ``a * act(b)``; ``norm``: an optional function on it; fc2_weight:
    [C_out, Hid]. Returns [..., C_out].
    """
    first, second = F.linear(x, fc1_weight, fc1_bias).chunk(2, dim=-1)
    hidden = first * act(second) if gate_last else act(first) * second
    if norm is not None:
        hidden = norm(hidden)
    return F.linear(hidden, fc2_weight, fc2_bias)


def swiglu_mlp(x, fc1_g_weight, fc1_g_bias, fc1_x_weight, fc1_x_bias, fc2_weight, fc2_bias, norm=None):
    """SwiGLU with split fc1 (timm's ``SwiGLU``): ``fc2(norm(silu(x W_gᵀ + b_g) * (x W_xᵀ + b_x)))``.

    x: [..., C]; fc1_g_weight, fc1_x_weight: [Hid, C]; ``norm``: optional function on the [..., Hid] hidden layer
    (EVA02's sub-LN); fc2_weight: [C_out, Hid].
    """
    hidden = F.silu(F.linear(x, fc1_g_weight, fc1_g_bias)) * F.linear(x, fc1_x_weight, fc1_x_bias)
    if norm is not None:
        hidden = norm(hidden)
    return F.linear(hidden, fc2_weight, fc2_bias)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H·D] -> [B, H, N, D]."""
    batch, tokens, width = t.shape
    return t.reshape(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H·D]."""
    batch, heads, tokens, head_dim = t.shape
    return t.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def qk_norm(norm):
    """The function a ``fastvit.ops.QKNorm`` (weight, bias, eps, kind) applies to [..., D] head vectors; identity
    for None. LayerNorm ('layer', bias optional) or RMSNorm ('rms')."""
    if norm is None:
        return lambda x: x

    def apply(x: torch.Tensor) -> torch.Tensor:
        weight = norm.weight.to(x.dtype)
        if norm.kind == "rms":
            return rms_norm(x, weight, norm.eps)
        return F.layer_norm(x, x.shape[-1:], weight, None if norm.bias is None else norm.bias.to(x.dtype), norm.eps)

    return apply


def qk_norm_attention(
    qkv, num_heads, q_norm, k_norm, scale=None, rope=None, num_prefix_tokens=0, rotate_half=False, key_padding_mask=None
):
    """Self-attention on a packed qkv buffer with q and k normalised per head (qk-norm) and optionally rotated.

    qkv: [B, N, 3·C] (timm's layout); ``q_norm``, ``k_norm``: functions on the [..., D] head vectors (timm's
    ``attn.q_norm``/``attn.k_norm``: LayerNorm or RMSNorm over D), applied before attention; ``rope``: optional
    [N - num_prefix_tokens, 2·D] sin/cos table (see :func:`apply_rope`), applied after the norms to every token but
    the first ``num_prefix_tokens``. Returns [B, N, C].
    """
    q, k, v = (split_heads(part, num_heads) for part in qkv.chunk(3, dim=-1))
    q, k = q_norm(q), k_norm(k)
    if rope is not None:
        q = apply_rope(q, rope, num_prefix_tokens, rotate_half)
        k = apply_rope(k, rope, num_prefix_tokens, rotate_half)
    return merge_heads(attention(q, k, v, scale=scale, key_padding_mask=key_padding_mask))


def attention_pool(
    x, latent, q_weight, q_bias, kv_weight, kv_bias, proj_weight, proj_bias, num_heads, norm, mlp, q_norm=None,
    k_norm=None, key_padding_mask=None,
):  # fmt: skip
    """timm's ``AttentionPoolLatent`` (SigLIP's ``global_pool='map'``): one learned query attends over the tokens.

    x: [B, N, C]; latent: [1, 1, C]; q_weight: [C, C]; kv_weight: [2·C, C] (k rows, then v rows); proj_weight: [C, C].
    ``norm`` and ``mlp`` are functions on [..., C]; ``q_norm`` / ``k_norm`` functions on each head vector (qk-norm),
    None: none. ``key_padding_mask``: [B, N] bool, True = the token is pooled (see :func:`attention_probs`).
    Returns [B, C]: ``y = proj(attention(q_norm(q(latent)), k_norm(k(x)), v(x)))`` then ``y + mlp(norm(y))``.
    """
    q = split_heads(F.linear(latent, q_weight, q_bias).expand(x.shape[0], -1, -1), num_heads)
    k, v = (split_heads(part, num_heads) for part in F.linear(x, kv_weight, kv_bias).chunk(2, dim=-1))
    q, k = (q if q_norm is None else q_norm(q)), (k if k_norm is None else k_norm(k))
    y = F.linear(merge_heads(attention(q, k, v, key_padding_mask=key_padding_mask)), proj_weight, proj_bias)
    return (y + mlp(norm(y)))[:, 0]


def apply_rope(x: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int = 0, rotate_half: bool = False):
    """Rotary position embedding of ``x`` [B, H, N, D] from a [N - T, 2·D] table ``rope = cat(sin, cos)``.

    Each pair of channels is rotated by its angle: ``x·cos + rot(x)·sin``, where ``rot`` pairs channel i with its
    partner, negating the first of each pair: *interleaved* pairs (2i, 2i+1) -> (-x[2i+1], x[2i]) (EVA02, timm's
    default), or *rotate-half* pairs (i, i + D/2) -> (-x[i + D/2], x[i]) (DINOv3, ``rotate_half=True``). The first
    ``num_prefix_tokens`` tokens (class / register) are left unrotated.
    """
    sin, cos = rope.chunk(2, dim=-1)
    prefix, patches = x[:, :, :num_prefix_tokens], x[:, :, num_prefix_tokens:]
    if rotate_half:
        first, second = patches.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
    else:
        pairs = patches.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return torch.cat([prefix, patches * cos + rotated * sin], dim=2)
