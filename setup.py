"""Build configuration beyond pyproject.toml: the optional compiled noise loop.

The extension is plain C loaded with ctypes (no Python headers needed); when
it cannot be built, torchbragg falls back to the same loop in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "torchbragg._noise",
            ["src/torchbragg/_noise.c"],
            extra_compile_args=["-O2", "-ffp-contract=off", "-fno-fast-math"],
            libraries=["m"],
            optional=True,
        )
    ]
)
