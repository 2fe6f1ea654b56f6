"""Build robustness: fastvit imports and explains itself without its optional pieces, and setup.py's switches do
what the README says (checked without building; one real, fast-failing build with an unknown CUDA arch).

Everything that builds copies the sources into a temporary directory: the in-place ``fastvit/_C*.so`` is never
touched.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _python(code: str, cwd: pathlib.Path = REPO, timeout: int = 180, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    for name, value in env.items():
        if value is None:
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout
    )


# ------------------------------------------------------------------------------------------------
# Importing without the optional pieces


def test_fastvit_no_ext_imports_explains_and_runs_the_reference():
    code = r"""
import torch, fastvit
report = fastvit.backends()
print("cuda:", report["cuda"].available, report["cuda"].reason)
print("torch:", report["torch"].available)
x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)
print("reference:", tuple(fastvit.ops.layer_norm(x, w, b, backend="torch").shape))
try:
    fastvit.ops.layer_norm(x, w, b, backend="cuda")
except RuntimeError as exc:
    print("explicit:", exc)
print("registered:", hasattr(torch.ops.fastvit, "layer_norm_fwd"))
model = fastvit.create_model("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=3)
print("model:", tuple(model(torch.randn(1, 3, 32, 32)).shape))
"""
    result = _python(code, FASTVIT_NO_EXT="1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cuda: False FASTVIT_NO_EXT=1: the extension is disabled" in out
    assert "torch: True" in out and "reference: (2, 8)" in out and "model: (1, 3)" in out
    assert re.search(r"explicit: layer_norm: backend 'cuda' cannot run on cpu tensors here: FASTVIT_NO_EXT=1", out)
    assert "registered: False" in out  # the extension's ops are not even loaded


def test_info_command_reports_every_backend_without_the_extension():
    result = subprocess.run(
        [sys.executable, "-m", "fastvit", "info"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "FASTVIT_NO_EXT": "1"},
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    for line in ("torch   yes", "triton ", "cuda    no   FASTVIT_NO_EXT=1"):
        assert line in result.stdout, result.stdout


def test_import_with_neither_triton_nor_the_extension():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['fastvit._C'] = None\n"
        "import torch, fastvit\n"
        "r = fastvit.backends()\n"
        "print([(n, i.available) for n, i in r.items()])\n"
        "print(r['triton'].reason)\n"
        "print(r['cuda'].reason)\n"
        "m = fastvit.create_model('vit_tiny_patch16_224', depth=1, img_size=32, num_classes=3)\n"
        "print(tuple(m(torch.randn(1, 3, 32, 32)).shape))\n"
        "w = torch.randn(6, 3, 4, 4)\n"
        "print(tuple(fastvit.ops.patch_embed_uint8(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), w, None).shape))\n"
        "print(tuple(fastvit.ops.layer_norm(torch.randn(2, 6), torch.ones(6), torch.zeros(6)).shape))\n"
        "calls = [lambda: fastvit.ops.patch_embed(torch.randn(1, 3, 8, 8), w, None, backend='triton'),\n"
        "         lambda: fastvit.ops.layer_norm(torch.randn(2, 6), torch.ones(6), torch.zeros(6), backend='cuda')]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as e:\n"
        "        print('refused:', e)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "[('torch', True), ('triton', False), ('cuda', False)]" in result.stdout
    assert "triton is not importable" in result.stdout and "fastvit._C is not built" in result.stdout
    assert "(1, 3)" in result.stdout and "(1, 4, 6)" in result.stdout and "(2, 6)" in result.stdout
    # an explicit fused backend that cannot run says why instead of falling back
    assert result.stdout.count("refused:") == 2, result.stdout


# ------------------------------------------------------------------------------------------------
# setup.py's switches, read without building: setuptools.setup is replaced by a recorder

_READ_SETUP = r"""
import json, runpy, setuptools
recorded = {}
setuptools.setup = lambda **kwargs: recorded.update(kwargs)
namespace = runpy.run_path("setup.py", run_name="not_main")
extensions = recorded["ext_modules"]
print(json.dumps({
    "count": len(extensions),
    "kind": ["cuda" if any(s.endswith(".cu") for s in e.sources) else "cpp" for e in extensions],
    "sources": [s for e in extensions for s in e.sources],
    "compile_args": [e.extra_compile_args for e in extensions],
    "cuda_home": namespace["_find_cuda_home"](),
    "arch_list": __import__("os").environ.get("TORCH_CUDA_ARCH_LIST"),
}))
"""


def _read_setup(**env) -> dict:
    result = _python(_READ_SETUP, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_setup_no_ext_builds_nothing():
    info = _read_setup(FASTVIT_NO_EXT="1")
    assert info["count"] == 0


def test_setup_force_cpu_builds_the_cpp_extension_only():
    info = _read_setup(FASTVIT_FORCE_CPU="1", FASTVIT_NO_EXT=None, DEBUG=None)
    assert info["count"] == 1 and info["kind"] == ["cpp"]
    assert not any(s.endswith(".cu") for s in info["sources"])
    assert "-O3" in info["compile_args"][0]["cxx"]


def test_setup_debug_flags():
    info = _read_setup(FASTVIT_FORCE_CPU="1", DEBUG="1", FASTVIT_NO_EXT=None)
    assert info["compile_args"][0]["cxx"][:2] == ["-O0", "-g"]


def test_setup_cuda_build_defaults_to_sm80_and_sm90a_and_keeps_a_user_arch_list():
    info = _read_setup(FASTVIT_NO_EXT=None, FASTVIT_FORCE_CPU=None, TORCH_CUDA_ARCH_LIST=None)
    if info["cuda_home"] is None:
        pytest.skip("no CUDA toolkit (nvcc + cuda_runtime.h): setup.py builds the C++ extension here")
    assert info["kind"] == ["cuda"] and any(s.endswith(".cu") for s in info["sources"])
    assert info["arch_list"] == "8.0;9.0a"
    assert "-DFASTVIT_WITH_CUDA" in info["compile_args"][0]["nvcc"]
    assert _read_setup(FASTVIT_NO_EXT=None, FASTVIT_FORCE_CPU=None, TORCH_CUDA_ARCH_LIST="8.6")["arch_list"] == "8.6"


# ------------------------------------------------------------------------------------------------
# A real build with an unsupported TORCH_CUDA_ARCH_LIST: a clear error naming the arch


def _source_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("csrc", "fastvit", "kernels"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return src


def _build(tmp_path: pathlib.Path, arch_list: str, timeout: int) -> subprocess.CompletedProcess:
    src = _source_copy(tmp_path)
    command = [
        sys.executable, "setup.py", "build_ext",
        "--build-temp", str(tmp_path / "temp"), "--build-lib", str(tmp_path / "lib"),
    ]  # fmt: skip
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": arch_list, "MAX_JOBS": "1"}
    for name in ("FASTVIT_NO_EXT", "FASTVIT_FORCE_CPU"):
        env.pop(name, None)
    return subprocess.run(command, capture_output=True, text=True, cwd=src, env=env, timeout=timeout)


def _needs_cuda_toolkit():
    info = _read_setup(FASTVIT_NO_EXT=None, FASTVIT_FORCE_CPU=None)
    if info["cuda_home"] is None:
        pytest.skip("no CUDA toolkit: TORCH_CUDA_ARCH_LIST is not used by the C++-only build")


@pytest.mark.parametrize(
    "arch_list, message",
    [
        ("7.0", "includes '7.0'; the CUDA kernels need compute capability 8.0 or newer"),  # known to torch, too old
        ("sm_90", "entry 'sm_90' is not like '8.0' or '9.0a'"),
        ("9.0;foo", "entry 'foo' is not like '8.0' or '9.0a'"),
    ],
)
def test_unsupported_cuda_arch_fails_fast_naming_it(tmp_path, arch_list, message):
    _needs_cuda_toolkit()
    result = _build(tmp_path, arch_list, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "lib").rglob("_C*.so"))
