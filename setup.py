"""Build hook for the native parts of fedkernels.

`csrc/` holds C++ sources (the exact knapsack DP of `solvers`). They are compiled as optional
extensions: when no compiler is present the build goes on and `solvers` falls back to its
pure-Python/numpy implementation, so installation never fails for lack of a toolchain.
"""

from __future__ import annotations

import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install when one cannot be compiled."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "use the fallback"
            print(f"fedkernels: native extensions skipped ({exc}); pure-Python fallbacks will be used")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"fedkernels: could not build {ext.name} ({exc}); pure-Python fallback will be used")


def native_extensions() -> list[Extension]:
    """One extension per `csrc/<name>.cpp` declaring `PyInit__<name>` (built into `solvers/`)."""
    if os.environ.get("FEDKERNELS_NO_NATIVE"):
        return []
    exts = []
    for src in sorted(glob.glob(os.path.join("csrc", "*.cpp"))):
        name = os.path.splitext(os.path.basename(src))[0]
        exts.append(
            Extension(
                f"solvers._{name}",
                sources=[src],
                language="c++",
                extra_compile_args=["-O3", "-std=c++17"],
                optional=True,
            )
        )
    return exts


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
