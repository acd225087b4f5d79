"""Package layout that pyproject.toml cannot express alone, and the optional C++/CUDA extension.

* ``kernels/icrl_kernels/`` installs as the import ``icrl_kernels``. ``kernels/`` itself has no ``__init__.py``: a
  directory without one is only a namespace-package candidate, so from the repository root (first on ``sys.path``
  under ``python -m``) ``import kernels`` still finds Hugging Face's ``kernels`` package, which transformers
  imports when it is installed (tests/test_packaging.py checks it).
* ``icrl_fast._C`` (csrc/: the batched Frozen Lake as torch ops) is built only when torch is importable at build
  time and a C++ compiler is present; its CUDA kernels only with nvcc and a CUDA build of torch. A plain
  ``pip install -e .`` builds in an isolated environment without torch, so it stays pure Python and works (the
  Numba simulator is used). To build the extension into the package::

      ICRL_BUILD_EXT=1 pip install -e . --no-build-isolation

  ``ICRL_BUILD_EXT``: ``1`` builds (and fails loudly if it cannot), ``0`` never builds, unset builds when possible.
  The tests build the same sources just in time instead (``icrl_fast/envs/ext.py``), so CI always checks them.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["icrl_fast", "icrl_fast.*"])
packages += find_packages(where="kernels", include=["icrl_kernels", "icrl_kernels.*"])


def extension():
    """``(ext_modules, cmdclass)`` for icrl_fast._C, or empty when it should not or cannot be built."""
    want = os.environ.get("ICRL_BUILD_EXT", "auto")
    if want == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if want == "1":
            sys.exit("ICRL_BUILD_EXT=1 needs torch importable at build time: pip install --no-build-isolation")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        if want == "1":
            sys.exit("ICRL_BUILD_EXT=1 needs a C++ compiler (c++ or $CXX)")
        return [], {}
    sources = ["csrc/frozen_lake_ops.cpp"]
    args = {"cxx": ["-O3"]}  # the C++ standard: torch's own choice for its headers
    if torch.version.cuda and shutil.which("nvcc"):
        sources.append("csrc/frozen_lake_cuda.cu")
        args["cxx"].append("-DICRL_WITH_CUDA")
        args["nvcc"] = ["-O3", "-std=c++17", "-DICRL_WITH_CUDA"]
        ext = CUDAExtension("icrl_fast._C", sources, extra_compile_args=args)
    else:
        ext = CppExtension("icrl_fast._C", sources, extra_compile_args=args)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension()
setup(packages=packages, package_dir={"icrl_kernels": "kernels/icrl_kernels"}, ext_modules=ext_modules, cmdclass=cmdclass)
