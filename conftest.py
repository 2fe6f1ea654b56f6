"""Repository-wide pytest set-up, loaded before any test module imports fastvit.

Without a GPU, Triton kernels can run only in Triton's interpreter, and ``triton.jit`` reads
``TRITON_INTERPRET`` when it decorates a kernel (at import), so the switch must be on before
fastvit is imported. On a GPU machine nothing is set: kernels compile for the device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
