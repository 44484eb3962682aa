import os

import pytest

# The Triton interpreter runs kernels on CPU tensors; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_index_fix() -> None:
    """Triton < 3.8's interpreter turns a runtime loop bound into a Python int with ``int()`` of a one-element
    array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"); Triton 3.8 squeezes the array
    first. Do the same on the older versions, so the interpreter tests run on the oldest supported stack (the GPU
    machine's triton 3.6 with numpy 2.5). Tests only: the compiled kernels never see the interpreter."""
    if os.environ["TRITON_INTERPRET"] != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "squeezes_index", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_index = True
    interpreter._patch_lang_tensor = patched


_interpreter_index_fix()


@pytest.fixture(autouse=True)
def fresh_choices():
    """The backend and tile choices are remembered for the process (``ops.forget_choices``): a test that fakes a
    device, a table or a backend's status must not see choices another test made, nor leave its own behind."""
    from mora_kernels import ops

    ops.forget_choices()
    yield
    ops.forget_choices()


@pytest.fixture
def poison_empty(monkeypatch):
    """Every float buffer from torch.empty starts as NaN, so an output element a kernel forgets to write shows up
    (the kernel tests use it for all their tests)."""
    import torch

    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty)



@pytest.fixture
def matmul_precision(request):
    """Sets ``torch.set_float32_matmul_precision(request.param)`` for the test and restores the previous mode
    (parametrized with ``indirect=True``)."""
    import torch  # here, as the fixtures above: this module sets TRITON_INTERPRET before anything imports triton

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(before)
