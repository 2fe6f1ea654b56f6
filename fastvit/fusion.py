"""The fusion report: which half of each block (and the patch embedding, and the pooling head) runs as one fused op on
fused kernels, and why not.

Whether a half is *structurally* fusable is the blocker list of ``fastvit.layers`` (``attention_half_blockers``,
``mlp_half_blockers``: the same functions the forward asks); whether each op of the half then runs a fused
*kernel* for a given device and dtype is dispatch's rule (``fastvit.dispatch.explain``), asked with the op's
call signature, which on a GPU includes the selftest evidence (``fastvit.verification``, shown per op). This
module only puts the answers together.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from fastvit import dispatch, verification
from fastvit.layers import (
    MLP_TYPES,
    Attention,
    AttentionPoolLatent,
    EvaBlock,
    ParallelScalingBlock,
    PatchEmbed,
    ResidualLinear,
    attention_half_blockers,
    eva_attention_half_blockers,
    eva_mlp_half_blockers,
    fused_mlp_call,
    in_proj_blockers,
    layer_norm_prologue_fits,
    mlp_blockers,
    mlp_half_blockers,
    norm_kind,
    parallel_block_blockers,
    patch_embed_blockers,
    prologue_blockers,
    qk_norm_params,
)
from fastvit.ops.attention import attention_call
from fastvit.ops.patch_embed import PatchEmbedCall

# ------------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass(frozen=True)
class HalfFusion:
    """How one half of a ``Block`` runs: see :func:`block_fusion`.

    Attributes:
        fused: the residual add is inside the half's last op and every op of the half runs a fused kernel.
        backends: {op name: the backend that runs it} ('unusable' for an explicit backend that cannot run).
        why_not: the reasons it is not fused (empty when ``fused``).
        evidence: {op name: the selftest evidence behind ``auto``'s choice on a GPU} (empty on CPU and for the
            torch backend; see ``fastvit.verification.evidence_state``).
    """

    fused: bool
    backends: dict[str, str]
    why_not: tuple[str, ...]
    evidence: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        ops_text = ", ".join(f"{op}={backend}" for op, backend in self.backends.items())
        text = f"fused ({ops_text})" if self.fused else f"unfused ({ops_text}): " + "; ".join(self.why_not)
        if self.fused and self.evidence:
            text += "; evidence: " + "; ".join(f"{op}: {state}" for op, state in self.evidence.items())
        return text


class BackendPlan(dict):
    """``VisionTransformer.backend_plan()``: {op name: backend it runs on}, plus ``evidence`` {op name: the
    selftest evidence behind ``auto``'s choice on a GPU ('' where none plays a part)}."""

    def __init__(self, backends: dict[str, str], evidence: dict[str, str]):
        super().__init__(backends)
        self.evidence = evidence

    def __str__(self) -> str:
        return "\n".join(
            f"{op:<16} {backend}" + (f"  ({self.evidence[op]})" if self.evidence.get(op) else "")
            for op, backend in self.items()
        )


class FusionReport(list):
    """``VisionTransformer.fusion_report()``: one {'attn': HalfFusion, 'mlp': HalfFusion} per block; ``embed``: the
    patch embedding's HalfFusion (None when the model did not report one); ``pool``: the attention-pooling head's
    {'attn', 'mlp'} (``global_pool='map'``), None without one."""

    embed: HalfFusion | None = None
    pool: dict[str, HalfFusion] | None = None

    @property
    def all_fused(self) -> bool:
        parts = [*self, self.pool] if self.pool is not None else list(self)
        embed_fused = self.embed is None or self.embed.fused
        return embed_fused and all(half.fused for part in parts for half in part.values())

    def __str__(self) -> str:
        lines = [] if self.embed is None else [f"patch_embed    {self.embed}"]
        for index, block in enumerate(self):
            for half, status in block.items():
                lines.append(f"block {index:>2} {half:<4} {status}")
        for half, status in (self.pool or {}).items():
            lines.append(f"attn_pool {half:<4} {status}")
        return "\n".join(lines)


def _half(why_not: list[str], op_calls: dict[str, tuple[str | None, object]]) -> HalfFusion:
    """``op_calls``: {op: (backend asked for, call signature)}; dispatch says which backend runs each."""
    backends, evidence = {}, {}
    for op, (backend, call) in op_calls.items():
        backends[op], reason = dispatch.explain(op, backend, call)
        if reason is not None:
            why_not.append(f"{op}: {reason}")
        state = verification.evidence_state(op, backend, call.device, verification.compute_dtype(call))
        if state:
            evidence[op] = state
    return HalfFusion(fused=not why_not, backends=backends, why_not=tuple(why_not), evidence=evidence)


def block_fusion(block: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, HalfFusion]:
    """Which halves of a fastvit ``Block`` run fused for inputs on ``device`` computing in ``dtype``, in the
    block's current train/eval mode and structure, and why not."""
    attn_calls, attn_why = {}, list(attention_half_blockers(block))
    if isinstance(block.attn, Attention):
        attn_calls.update(_attention_op_call(block.attn, device, dtype, block.training, False, block.attn.packed()))
        attn_why.extend(f"qk-norm: {reason}" for reason in prologue_blockers(block.attn))
        if isinstance(block.attn.proj, ResidualLinear):
            attn_calls["linear_residual"] = (block.attn.proj.backend, dispatch.DeviceDtypeCall(device, dtype))
    mlp_calls = {}
    if isinstance(block.mlp, MLP_TYPES):
        mlp_calls["ln_mlp"] = (block.mlp.backend, fused_mlp_call(block.norm2, block.mlp, device, dtype))
    structural = not attn_why
    attn_half = _half(attn_why, attn_calls)
    if structural and layer_norm_prologue_fits(block.norm1, block.attn.qkv):
        # norm1 + qkv: ops.ln_linear where 'auto' has a measured win for the Triton GEMM, else LayerNorm then cuBLAS
        # ('torch'), the other implementation by design: shown, never a reason the half is unfused.
        qkv = block.attn.qkv
        call = qkv.gemm_call(device, dtype, norm=True)
        backends = {"ln_linear": dispatch.explain("ln_linear", qkv.backend, call)[0], **attn_half.backends}
        attn_half = dataclasses.replace(attn_half, backends=backends)
    return {"attn": attn_half, "mlp": _half(list(mlp_half_blockers(block)), mlp_calls)}


def _prologue_parts(attn: nn.Module, rope: bool) -> tuple[str, ...]:
    """The prologue parts (``AttentionPrologue.describe``) of ``attn``'s ``ops.qkv_attention`` call."""
    parts = [f"rope:{'half' if attn.rotate_half else 'interleaved'}"] if rope else []
    for name in ("q_norm", "k_norm"):
        norm = qk_norm_params(getattr(attn, name))
        if norm is not None:
            parts.append(f"{name}:{norm.kind}")
    return tuple(parts)


def _attention_op_call(attn: nn.Module, device, dtype, training: bool, rope: bool, fused: bool) -> dict[str, tuple]:
    """{op: (backend, call)} of the attention op ``attn`` runs: ``qkv_attention`` with its prologue when ``fused``
    (``rope``: a RoPE table is passed), else ``attention``."""
    dropout = training and getattr(attn.attn_drop, "p", 0.0) > 0.0
    if fused:
        call = attention_call(device, dtype, attn.head_dim, dropout=dropout, prologue=_prologue_parts(attn, rope))
        return {"qkv_attention": (attn.backend, call)}
    return {"attention": (attn.backend, attention_call(device, dtype, attn.head_dim, dropout=dropout))}


def embed_fusion(embed: nn.Module, device: torch.device, dtype: torch.dtype | None) -> HalfFusion | None:
    """How the patch embedding runs: fused when it is one ``ops.patch_embed`` call (projection, the patch tokens' norm,
    prefix tokens and position embedding: ``patch_embed_blockers`` finds nothing) on a fused kernel. ``dtype``: the
    compute dtype (None: the embedding's parameters'). None (not reported) for an embedding other than fastvit's
    ``PatchEmbed`` (NaFlex's, which takes patches too)."""
    if not isinstance(embed, PatchEmbed):
        return None
    if dtype is None:  # proj may be an adapter around the Conv2d: any floating parameter says the dtype
        dtype = next((p.dtype for p in embed.parameters() if p.is_floating_point()), torch.get_default_dtype())
    why = patch_embed_blockers(embed)
    norm = None if why else norm_kind(embed.norm)
    in_chans = getattr(embed.proj, "in_channels", embed.in_chans)
    call = PatchEmbedCall(device, (dtype,), None, in_chans, False, norm)
    return _half(why, {"patch_embed": (embed.backend, call)})


def pool_fusion(pool: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, HalfFusion]:
    """How an attention-pooling head runs: its attention is one ``ops.attention`` call (one query per image, broadcast
    from the latent; the qk-norms inside the kernels while ``prologue_blockers`` finds nothing; a key-padding mask
    inside too), its q/kv/proj Linears GEMMs of their own (as a ``Block``'s qkv Linear; proj has no residual to take
    in), and its ``x + mlp(norm(x))`` one ``ops.ln_mlp`` call while ``mlp_blockers`` finds nothing."""
    if not isinstance(pool, AttentionPoolLatent):
        why = (f"{type(pool).__name__} is not fastvit's AttentionPoolLatent",)
        return {half: HalfFusion(False, {}, why) for half in ("attn", "mlp")}
    attn_why = [f"qk-norm: {reason}" for reason in prologue_blockers(pool, "attn_pool.")]
    parts = () if attn_why else _prologue_parts(pool, rope=False)
    call = attention_call(device, dtype, pool.head_dim, prologue=parts)
    mlp_why = list(mlp_blockers(pool.norm, pool.mlp, pool.mlp.norm, pool.training))
    return {
        "attn": _half(attn_why, {"attention": (pool.backend, call)}),
        "mlp": _half(mlp_why, {"ln_mlp": (pool.mlp.backend, fused_mlp_call(pool.norm, pool.mlp, device, dtype))}),
    }


def eva_block_fusion(
    block: EvaBlock, device: torch.device, dtype: torch.dtype, rope: bool = True
) -> dict[str, HalfFusion]:
    """How an ``EvaBlock``'s halves run: the attention is one ``ops.qkv_attention`` call with qk-norm and RoPE as its
    prologue while ``prologue_blockers`` finds nothing (RoPE-Mixed's per-head tables included), else the modules, then
    ``ops.attention``; proj, ``gamma_1`` and the residual add are one ``ops.linear_residual`` call under
    ``eva_attention_half_blockers``. The MLP half is one ``ops.ln_mlp`` call under ``eva_mlp_half_blockers``.
    ``rope``: the model passes its blocks a RoPE table."""
    attn = block.attn
    attn_why = [f"qk-norm / RoPE: {reason}" for reason in prologue_blockers(attn)]
    fused = not attn_why
    attn_why.extend(eva_attention_half_blockers(block))
    attn_calls = _attention_op_call(attn, device, dtype, block.training, rope, fused)
    if isinstance(attn.proj, ResidualLinear):
        attn_calls["linear_residual"] = (attn.proj.backend, dispatch.DeviceDtypeCall(device, dtype))
    mlp_calls = {}
    if isinstance(block.mlp, MLP_TYPES):
        mlp_calls["ln_mlp"] = (block.mlp.backend, fused_mlp_call(block.norm2, block.mlp, device, dtype))
    return {
        "attn": _half(attn_why, attn_calls),
        "mlp": _half(list(eva_mlp_half_blockers(block)), mlp_calls),
    }


def parallel_block_fusion(block: ParallelScalingBlock, device: torch.device, dtype: torch.dtype) -> dict:
    """How a ``ParallelScalingBlock`` runs: in_norm, in_proj and the MLP's activation as one ``ops.ln_linear`` call
    (the norm as the GEMM's prologue, the activation on the MLP's columns in its epilogue) while ``in_proj_blockers``
    finds nothing and dispatch runs a fused GEMM for it; ``ops.attention`` on q/k/v views of that output; one
    ``ops.linear_residual`` per out projection while ``parallel_block_blockers`` finds nothing. The in_proj GEMM is
    reported with the MLP half (it holds fc1)."""
    blockers = list(parallel_block_blockers(block))
    residual_call = dispatch.DeviceDtypeCall(device, dtype)
    prologue_why = [f"qk-norm: {reason}" for reason in prologue_blockers(block)]
    attn_why = [*blockers, *prologue_why]
    attn_calls = _attention_op_call(block, device, dtype, block.training, False, not prologue_why)
    mlp_calls = {"ln_linear": (getattr(block.in_proj, "backend", None), block.in_proj_call(device, dtype))}
    if block.out_proj is None:
        attn_calls["linear_residual"] = (block.attn_out_proj.backend, residual_call)
        mlp_calls["linear_residual"] = (block.mlp_out_proj.backend, residual_call)
    mlp_why = [*blockers, *(f"in_proj: {reason}" for reason in in_proj_blockers(block))]
    return {"attn": _half(attn_why, attn_calls), "mlp": _half(mlp_why, mlp_calls)}
