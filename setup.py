"""Build script. A plain ``pip install -e .`` compiles nothing and needs no nvcc; the CUDA extension is built ahead of
time only when ``MORA_KERNELS_BUILD_CUDA=1`` (with ``--no-build-isolation``, so that the installed CUDA torch is
used). Otherwise it is built just in time on first use (see ``mora_kernels/cuda_build.py``)."""

import os
import sys

from setuptools import setup


def cuda_extension() -> dict:
    if os.environ.get("MORA_KERNELS_BUILD_CUDA", "0") != "1":
        return {}
    # The sources, flags and toolkit detection are shared with the just-in-time build.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mora_kernels import cuda_build

    cuda_build.configure_build_environment()  # CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS, before CUDAExtension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    extension = CUDAExtension(
        name="mora_kernels._mora_cuda",
        sources=[os.path.join("csrc", name) for name in cuda_build.SOURCES],
        include_dirs=[str(cuda_build.cutlass_include_dir())],
        extra_compile_args={"cxx": list(cuda_build.CXX_FLAGS), "nvcc": list(cuda_build.NVCC_FLAGS)},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension())
