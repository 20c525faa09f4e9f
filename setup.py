"""Builds the CPU kernels in kimi_jax/model/kernels/src; everything else is in pyproject.toml.

The kernels are XLA FFI handlers (C++ against jaxlib's header-only FFI API, a build requirement) that
kimi_jax/model/kernels loads with ctypes: a plain shared library, so setuptools' Extension is all
the build needs (no CMake, no binding generator). One build serves every x86-64 CPU: the AVX2 and
AVX-512 code paths are compiled in with target pragmas and chosen at run time by CPUID. The
extension is optional: without a C++ compiler (or jaxlib's headers) the install still succeeds and
kimi-jax computes on its XLA path, saying so once.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SRC = Path("kimi_jax/model/kernels/src")
SOURCES = ["ffi.cpp", "pool.cpp", "isa_portable.cpp", "isa_avx2.cpp", "isa_avx512.cpp", "module.cpp"]


def ffi_include_dir() -> str | None:
    """jaxlib's FFI headers (what ``jax.ffi.include_dir()`` returns), found without importing jax."""
    spec = importlib.util.find_spec("jaxlib")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = Path(location) / "include"
        if (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
            return str(include)
    return None


class BuildKernels(build_ext):
    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the five sources compile independently
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        include = ffi_include_dir()
        if include is None:
            print("kimi-jax: jaxlib's FFI headers were not found; the CPU kernels are not built "
                  "(kimi-jax will compute on its XLA path)")
            self.extensions = []
            return
        for ext in self.extensions:
            ext.include_dirs.append(include)
        super().build_extensions()


kernels = Extension(
    "kimi_jax.model.kernels._kimi_jax_kernels",
    sources=[str(SRC / name) for name in SOURCES],
    depends=[str(p) for p in SRC.glob("*.h")] + [str(p) for p in SRC.glob("*.inc")],
    language="c++",
    # -ffp-contract=off: no multiply-add the source does not write (the portable path's products are
    # rounded before they are added). No -march: the ISA paths are selected at run time.
    extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-ffp-contract=off", "-g0"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[kernels], cmdclass={"build_ext": BuildKernels})
