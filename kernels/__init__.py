"""Triton kernels of fastvit, shipped as the package ``fastvit.kernels`` (setup.py maps this folder).

One file per op (``attention.py``, ``patch_embed.py``, ...): ``@triton.jit`` kernels only, with
every pointer argument's shape in a comment. Launchers, ``torch.library`` registration and
autograd live in ``fastvit/ops/<op>.py``; the pure-PyTorch spec in ``fastvit/reference.py``.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (how CI tests them).
"""
