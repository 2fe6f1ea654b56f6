"""Triton kernels of fastvit and their config tables, shipped as the package ``fastvit.kernels`` (setup.py maps
this folder).

One file per op (``attention.py``, ``patch_embed.py``, ...): ``@triton.jit`` kernels with every pointer argument's
shape in a comment, and the op's launch-config tables with the rules that choose among them (the attention
autotuner's candidates: ``attention.autotune_configs``, per GPU arch). Launchers, ``torch.library`` registration and
autograd live in ``fastvit/ops/<op>.py``; the pure-PyTorch spec in ``fastvit/reference.py``. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (how CI tests them).

``resources.py`` (``python -m fastvit.kernels.resources``) compiles every config the launchers may pick ahead of
time for sm_90a and sm_80, no GPU needed, and reports registers, spills and shared memory (CI requires no spill
and shared memory within the arch's limit; tables in ``benchmarks/results/resources-*.md``).
"""
