"""Build configuration beyond pyproject.toml: the optional compiled noise loop.

The extension is plain C loaded with ctypes (no Python headers needed); when
it cannot be built, torchbragg falls back to the same loop in Python. Where
the compiler has OpenMP, the detector-sampling passes run on several threads.
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        if self._has_openmp():
            for ext in self.extensions:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()

    def _has_openmp(self) -> bool:
        # a small program built with -fopenmp; a compiler without it builds the serial code
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "omp.c")
            with open(src, "w") as fh:
                fh.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objs, "omp", output_dir=tmp, extra_postargs=["-fopenmp"])
            except Exception:  # any failure to compile or link: no OpenMP
                return False
        return True


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "torchbragg._noise",
            ["src/torchbragg/_noise.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
            libraries=["m"],
            optional=True,
        )
    ],
)
