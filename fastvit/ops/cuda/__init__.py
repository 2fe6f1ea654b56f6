"""The ``cuda`` backend: the compiled extension ``fastvit._C`` (``csrc/``), one file per op.

The C++ library defines the ops (``TORCH_LIBRARY(fastvit, ...)``) and their CUDA and CPU kernels; each file
here registers the op with fastvit's dispatch, and its fake (meta) impls and autograd with ``torch.library``,
so ``torch.compile`` and backward see through the ops. Without the extension (``FASTVIT_NO_EXT=1``, or not
built) the files import and register nothing with torch.library; ``fastvit.backends()`` says why.
"""

from fastvit.ops.cuda import layer_norm, linear_residual, ln_mlp  # noqa: F401  (registrations)
