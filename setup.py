"""Build script for fastvit and its optional C++/CUDA extension ``fastvit._C``.

Switches (environment variables), in the style of flash-attention's setup.py:
  FASTVIT_NO_EXT=1        build no extension (pure Triton + PyTorch still work)
  FASTVIT_FORCE_CPU=1     build the C++ CPU extension even when nvcc is found
  TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0a"
  DEBUG=1                 compile with -O0 -g
  MAX_JOBS                parallel compile jobs (ninja)

The extension reports ``fastvit._C.source_hash()``, a hash of ``csrc/`` at build time (written to a generated
header in the build folder, included by ``csrc/bindings.cpp`` only): ``fastvit selftest`` records it with every
verdict, so evidence from other sources does not count for this build.

The CUDA build links cuBLASLt. When the CUDA toolkit lacks its headers or libraries (as on a
machine with nvcc but no full toolkit), they are taken from the pip ``nvidia-cublas`` package
that ships with PyTorch's CUDA wheels (``nvidia/cu13`` or ``nvidia/cublas``).
"""

import glob
import hashlib
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvidia_pip_dirs() -> tuple[list[str], list[str]]:
    """Include and library dirs of pip-installed NVIDIA packages that hold cuBLASLt."""
    include_dirs, library_dirs = [], []
    for site_dir in sys.path:
        for sub in ("nvidia/cu13", "nvidia/cu12", "nvidia/cublas"):
            base = Path(site_dir) / sub
            if (base / "include" / "cublasLt.h").exists():
                include_dirs.append(str(base / "include"))
            if glob.glob(str(base / "lib" / "libcublasLt.so*")):
                library_dirs.append(str(base / "lib"))
    return include_dirs, library_dirs


def _cublaslt_link_arg(library_dirs: list[str]) -> str:
    # pip wheels ship only the versioned soname (libcublasLt.so.13) with no unversioned symlink.
    for lib_dir in library_dirs:
        for path in sorted(glob.glob(os.path.join(lib_dir, "libcublasLt.so.*"))):
            major = os.path.basename(path).split(".so.")[1].split(".")[0]
            return f"-l:libcublasLt.so.{major}"
    return "-lcublasLt"


def _find_cuda_home() -> str | None:
    """A CUDA toolkit root holding both nvcc and the runtime headers.

    torch guesses CUDA_HOME from the location of ``nvcc`` on PATH; a wrapper script such as
    /usr/local/bin/nvcc makes that guess /usr/local, which has no CUDA headers. Check the usual
    roots explicitly instead.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return root
    return None


def _check_arch_list(arch_list: str) -> None:
    """Fail at once, with the reason, for GPU architectures the kernels do not support.

    The kernels use bf16 arithmetic and cuBLASLt features of sm_80+ (A100, H100, ...); without this
    check nvcc would fail minutes into the build with "Unsupported gpu architecture".
    """
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        arch = entry.strip().removesuffix("+PTX")
        if not arch:
            continue
        try:
            major, minor = (int(part) for part in arch.rstrip("af").split("."))
        except ValueError:
            raise SystemExit(f"fastvit: TORCH_CUDA_ARCH_LIST entry {entry!r} is not like '8.0' or '9.0a'") from None
        if (major, minor) < (8, 0):
            raise SystemExit(
                f"fastvit: TORCH_CUDA_ARCH_LIST={arch_list!r} includes {entry!r}; the CUDA kernels need compute "
                "capability 8.0 or newer (A100, H100, ...). Set e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0a', or "
                "FASTVIT_NO_EXT=1 to build without the extension (the Triton and PyTorch backends still work)."
            )


def csrc_source_hash(root: Path = ROOT) -> str:
    """A short hash of every file under ``csrc/`` (relative path and content, line endings normalised)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (root / "csrc").rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:16]


def _with_source_hash(build_ext_class):
    """``build_ext`` that first writes ``<build_temp>/fastvit_generated/fastvit_source_hash.h`` and puts it on the
    include path. Only bindings.cpp includes it, and the file is rewritten only when the hash changes, so editing a
    kernel recompiles that kernel and bindings.cpp, not everything (a -D flag would change every command line)."""

    class BuildExtWithSourceHash(build_ext_class):
        def build_extensions(self):
            generated = Path(self.build_temp).resolve() / "fastvit_generated"
            generated.mkdir(parents=True, exist_ok=True)
            header = generated / "fastvit_source_hash.h"
            text = f'#define FASTVIT_SOURCE_HASH "{csrc_source_hash()}"\n'
            if not header.exists() or header.read_text() != text:
                header.write_text(text)
            for extension in self.extensions:
                if str(generated) not in extension.include_dirs:
                    extension.include_dirs.append(str(generated))
            super().build_extensions()

    return BuildExtWithSourceHash


def _extensions():
    if _env_flag("FASTVIT_NO_EXT"):
        print("fastvit: FASTVIT_NO_EXT=1, building no C++/CUDA extension")
        return [], {}

    cuda_home = None if _env_flag("FASTVIT_FORCE_CPU") else _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils import cpp_extension

    debug = _env_flag("DEBUG")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob("*.cpp"))]
    cuda_sources = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob("*.cu"))]

    use_cuda = cuda_home is not None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        _check_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
        include_dirs, library_dirs = _nvidia_pip_dirs()
        cuda_home_lib = os.path.join(cpp_extension.CUDA_HOME, "lib64")
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]
        nvcc_flags += ["--expt-relaxed-constexpr", "-lineinfo"]
        print(
            f"fastvit: building CUDA extension (CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
            f"extra cuBLASLt dirs={include_dirs + library_dirs})"
        )
        ext = cpp_extension.CUDAExtension(
            name="fastvit._C",
            sources=sources + cuda_sources,
            include_dirs=[str(ROOT / "csrc")] + include_dirs,
            library_dirs=library_dirs + [cuda_home_lib],
            extra_compile_args={
                "cxx": cxx_flags + ["-DFASTVIT_WITH_CUDA"],
                "nvcc": nvcc_flags + ["-DFASTVIT_WITH_CUDA"],
            },
            extra_link_args=[_cublaslt_link_arg(library_dirs)] + [f"-Wl,-rpath,{d}" for d in library_dirs],
        )
    else:
        print("fastvit: nvcc/CUDA_HOME not found (or FASTVIT_FORCE_CPU=1), building the C++ CPU extension only")
        ext = cpp_extension.CppExtension(
            name="fastvit._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags},
        )
    return [ext], {"build_ext": _with_source_hash(cpp_extension.BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = _extensions()

setup(
    packages=["fastvit", "fastvit.ops", "fastvit.ops.triton", "fastvit.ops.cuda", "fastvit.kernels"],
    package_dir={"fastvit": "fastvit", "fastvit.kernels": "kernels"},
    package_data={"fastvit": ["verified.json"]},  # the selftest manifest written by GPU rounds
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
