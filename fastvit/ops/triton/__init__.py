"""The ``triton`` backend: host side of the Triton kernels in ``fastvit/kernels/``, one file per op.

Each file registers its op's implementations with fastvit's dispatch (with the ``supports`` predicate saying
which calls the kernels cover), and its launchers, ``torch.library`` custom ops (fake impls, autograd). Shared
launch helpers live in ``launch.py``. Nothing here imports Triton at import time.
"""

from fastvit.ops.triton import attention, patch_embed  # noqa: F401  (registrations)
