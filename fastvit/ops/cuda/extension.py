"""Registration helper shared by the ``cuda`` backend's op files."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastvit import dispatch
from fastvit.ops.autograd import no_double_backward


def register_extension_op(
    op_name: str, *, fakes: dict[str, Callable], backward: Callable, setup_context: Callable
) -> None:
    """Register ``fastvit::<name>`` fake impls and the autograd of ``fastvit::<op_name>_fwd``, if the extension
    is built. ``backward`` refuses double backward (:func:`fastvit.ops.autograd.no_double_backward`)."""
    if not dispatch.extension_available():
        return
    for name, fake in fakes.items():
        torch.library.register_fake(f"fastvit::{name}")(fake)
    torch.library.register_autograd(
        f"fastvit::{op_name}_fwd", no_double_backward(op_name)(backward), setup_context=setup_context
    )
