"""The CUDA extension's build cache is keyed by everything that changes the binary (torch, its CUDA, the toolkit, the
CUTLASS headers, the arch list, the flags, every source file), so that ``info`` never reports a build made for
something else. Checked on any CPU: nothing is compiled here."""

import importlib.util
import shutil

import pytest
import torch

from mora_kernels import cuda_build, cuda_mora


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A private copy of csrc/ the build key reads (so that a test can change a file)."""
    copy = tmp_path / "csrc"
    shutil.copytree(cuda_build.SOURCE_DIR, copy)
    monkeypatch.setattr(cuda_build, "SOURCE_DIR", copy)
    monkeypatch.setenv("MORA_KERNELS_BUILD_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    return copy


def test_the_sources_ship_where_the_build_looks():
    assert all((cuda_build.SOURCE_DIR / name).is_file() for name in cuda_build.SOURCES)


def test_the_key_is_stable(sources):
    assert cuda_build.build_key() == cuda_build.build_key()
    assert cuda_build.build_directory() == cuda_build.build_directory()
    assert cuda_build.build_directory().parent == sources.parent / "cache"


@pytest.mark.parametrize("change", ["torch", "torch_cuda", "toolkit", "cutlass", "arch_list", "flags", "source",
                                    "header", "new_file", "python"])
def test_every_input_of_the_binary_changes_the_folder(sources, monkeypatch, change):
    before = cuda_build.build_directory()
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    elif change == "torch_cuda":
        monkeypatch.setattr(torch.version, "cuda", "99.9")
    elif change == "toolkit":
        monkeypatch.setattr(cuda_build, "toolkit_version", lambda home: "99.9")
    elif change == "cutlass":  # the CuTe headers the GEMM includes
        monkeypatch.setattr(cuda_build, "cutlass_version", lambda: "99.9")
    elif change == "arch_list":
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    elif change == "flags":
        monkeypatch.setattr(cuda_build, "NVCC_FLAGS", (*cuda_build.NVCC_FLAGS, "-lineinfo"))
    elif change == "source":
        path = sources / "gemm.cu"
        path.write_bytes(path.read_bytes() + b"\n")
    elif change == "header":
        path = sources / "mora.h"
        path.write_bytes(path.read_bytes() + b"// changed\n")
    elif change == "new_file":
        (sources / "extra.cuh").write_text("// included by nobody yet\n")
    elif change == "python":
        key = cuda_build.build_key()
        assert cuda_build.build_directory({**key, "python": "3.99"}) != before
        return
    assert cuda_build.build_directory() != before


def test_a_build_for_another_key_is_not_reported(sources, monkeypatch):
    folder = cuda_build.build_directory()
    folder.mkdir(parents=True)
    (folder / f"{cuda_build.EXTENSION_NAME}.so").write_bytes(b"")
    monkeypatch.setattr(cuda_build, "_loaded_path", [])
    monkeypatch.setattr(cuda_build, "_ahead_of_time_library", lambda: None)
    assert cuda_build.info()["built"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert not cuda_build.info()["built"]


def test_toolkit_version_reads_cuda_h(tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda.h").write_text("#define CUDA_VERSION 12080\n")
    assert cuda_build.toolkit_version(tmp_path) == "12.8"
    assert cuda_build.toolkit_version(tmp_path / "missing") is None
    assert cuda_build.toolkit_version(None) is None


def test_cutlass_headers_from_the_variable_or_the_wheel(tmp_path, monkeypatch):
    """The CUTLASS include folder: $MORA_KERNELS_CUTLASS_INCLUDE when set (checked), else the nvidia-cutlass
    wheel's; with neither, an error naming both; its version.h versions the build key."""
    monkeypatch.setenv("MORA_KERNELS_CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(RuntimeError, match="MORA_KERNELS_CUTLASS_INCLUDE=.*expected a CUTLASS include folder"):
        cuda_build.cutlass_include_dir()
    assert cuda_build.cutlass_version() is None
    (tmp_path / "cute").mkdir()
    (tmp_path / "cute" / "tensor.hpp").write_text("")
    (tmp_path / "cutlass").mkdir()
    (tmp_path / "cutlass" / "version.h").write_text(
        "#define CUTLASS_MAJOR 9\n#define CUTLASS_MINOR 1\n#define CUTLASS_PATCH 2 \n")
    assert cuda_build.cutlass_include_dir() == tmp_path
    assert cuda_build.cutlass_version() == "9.1.2"
    monkeypatch.delenv("MORA_KERNELS_CUTLASS_INCLUDE")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"nvidia-cutlass wheel \(not installed\).*mora_kernels\[cuda\]"):
        cuda_build.cutlass_include_dir()



@pytest.mark.parametrize("headers", [True, False])
def test_status_names_missing_cutlass_headers(tmp_path, monkeypatch, headers):
    """On a GPU with nvcc and ninja, an unbuilt CUDA backend is usable (it builds just in time) only with the CUTLASS
    headers; without the nvidia-cutlass wheel or MORA_KERNELS_CUTLASS_INCLUDE it is not, and says what to install."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(cuda_mora, "info", lambda: {"built": False})
    monkeypatch.setattr(cuda_mora, "cuda_home", lambda: "/toolkit")
    monkeypatch.setattr(cuda_mora.shutil, "which", lambda name: f"/bin/{name}")
    monkeypatch.delenv("MORA_KERNELS_CUTLASS_INCLUDE", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no wheel
    if headers:  # a CUTLASS include folder named instead
        (tmp_path / "cute").mkdir()
        (tmp_path / "cute" / "tensor.hpp").write_text("")
        monkeypatch.setenv("MORA_KERNELS_CUTLASS_INCLUDE", str(tmp_path))
    usable, reason = cuda_mora.status(torch.device("cuda"))
    if headers:
        assert (usable, reason) == (True, "not built yet: builds just in time on first use (~1-2 minutes)")
    else:
        assert not usable and reason.startswith("not built, and") and "pip install 'mora_kernels[cuda]'" in reason
