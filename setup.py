"""Build script. A plain ``pip install -e .`` compiles nothing; the CUDA extension is built ahead of time only when
``MORA_KERNELS_BUILD_CUDA=1`` (see ``mora_kernels/cuda_mora.py`` for the just-in-time build)."""

from setuptools import setup

setup()
