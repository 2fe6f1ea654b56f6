"""Repository-wide pytest set-up, loaded before any test module imports fastvit.

Without a GPU, Triton kernels can run only in Triton's interpreter, and ``triton.jit`` reads
``TRITON_INTERPRET`` when it decorates a kernel (at import), so the switch must be on before
fastvit is imported. On a GPU machine nothing is set: kernels compile for the device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    # ``make test`` runs one xdist worker per core: one intra-op thread each (torch's default, a thread per core in
    # every worker, oversubscribes the cores), and the same for the processes the tests start (the demo, torchrun).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The modules that take minutes on a 2-core machine (the static ptxas compile of every launchable config, the demo,
# the benchmark smoke run, the multi-process training runs) are collected first: with the suite split over two
# workers (``make test``: pytest-xdist, one module per worker at a time) they then start at once instead of
# lengthening the tail.
LONG_MODULES = ("test_resources.py", "test_demo.py", "test_train.py", "test_benchmark_tools.py", "test_selftest.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
