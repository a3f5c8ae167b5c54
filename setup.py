"""Builds skyloom._C with CMake + ninja. Metadata lives in pyproject.toml.

Environment:
  SKYLOOM_CUDA=auto|0|1      build the CUDA kernels (auto: when nvcc and a CUDA torch are both present)
  SKYLOOM_CUDA_ARCHS=80;90a  CUDA architectures to compile for
  MAX_JOBS=N                 parallel compile jobs
  SKYLOOM_BUILD_TYPE=Release CMake build type
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _packages():
    core = ["skyloom"] + ["skyloom." + p for p in find_packages("core")]
    plugins = ["skyloom.plugins"] + ["skyloom.plugins." + p for p in find_packages("plugins")]
    return core + plugins


def _package_dirs():
    dirs = {"skyloom": "core", "skyloom.plugins": "plugins"}
    for p in find_packages("core"):
        dirs["skyloom." + p] = "core/" + p.replace(".", "/")
    for p in find_packages("plugins"):
        dirs["skyloom.plugins." + p] = "plugins/" + p.replace(".", "/")
    return dirs


def _want_cuda(torch) -> bool:
    setting = os.environ.get("SKYLOOM_CUDA", "auto").strip().lower()
    if setting not in ("auto", "0", "1"):
        sys.exit(f"SKYLOOM_CUDA={setting!r}: expected auto, 0 or 1")
    have_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    )
    have_cuda_torch = torch.version.cuda is not None
    if setting == "1" and not (have_nvcc and have_cuda_torch):
        sys.exit(
            "SKYLOOM_CUDA=1 but "
            + ("nvcc was not found" if not have_nvcc else f"torch {torch.__version__} is a CPU-only build")
            + ": install the CUDA toolkit and a CUDA build of torch, or set SKYLOOM_CUDA=auto"
        )
    return setting != "0" and have_nvcc and have_cuda_torch


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch
            import torch.utils.cpp_extension as cpp_ext
        except ImportError:
            sys.exit(
                "skyloom's extension builds against the installed torch, and none was found.\n"
                "Install torch first (CPU: `pip install torch==2.13.0`), then "
                "`pip install --no-build-isolation .` (see docs/building.md)."
            )
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda(torch)
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SKYLOOM_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_ext.include_paths())}",
            f"-DTORCH_LIBRARY_DIRS={';'.join(cpp_ext.library_paths())}",
            f"-DTORCH_VERSION={torch.__version__}",
            f"-DTORCH_CXX11_ABI={abi}",
            f"-DSKYLOOM_CUDA={'ON' if cuda else 'OFF'}",
            f"-DSKYLOOM_CUDA_ARCHS={os.environ.get('SKYLOOM_CUDA_ARCHS', '80;90a')}",
        ]
        build = ["cmake", "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.run(["cmake", *args], check=True)
        subprocess.run(build, check=True)


setup(
    packages=_packages(),
    package_dir=_package_dirs(),
    ext_modules=[CMakeExtension("skyloom._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
