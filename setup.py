"""Package layout that pyproject.toml cannot express alone: `kernels/` installs as the import `icrl_kernels`.

The optional C++/CUDA extension `icrl_fast._C` (csrc/) will be built here only when torch and a compiler
are present at build time; until csrc/ holds code there is nothing to build and the package is pure Python.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["icrl_fast", "icrl_fast.*"])
packages += ["icrl_kernels"] + ["icrl_kernels." + p for p in find_packages(where="kernels")]

setup(packages=packages, package_dir={"icrl_kernels": "kernels"})
