"""Builds the optional native reader. If it cannot be built, offload still installs and uses its python reader."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "offload._ol_native",
    sources=["native/ol_io.c", "native/ol_module.c"],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    optional=True,  # a failed compile is a warning, not a failed install
)])
