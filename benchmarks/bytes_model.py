"""A bytes-moved and launch-count MODEL of each provider on an H100, computed on CPU without a GPU.

Each provider's forward and backward run on ``meta`` tensors (shapes and dtypes, no data, no arithmetic) under a
``TorchDispatchMode`` that records every op that would launch a kernel: views and allocations launch none; every
other op counts as one launch that reads each tensor argument once and writes each output once. A tensor's bytes
are its elements times element size, counting a broadcast (stride-0) dimension once. Matrix products also count
``2 M N K`` FLOPs. An op registered outside ``aten`` (a fused custom op) counts like any other op: one launch that
reads its inputs and writes its outputs, which assumes it is one kernel whose intermediates stay on chip (a
backend op that launches several kernels, or spills an intermediate to memory, costs more than its row says).

The modelled time of an op is ``max(bytes / bandwidth, flops / peak) + launch overhead``: every kernel exactly at
its roofline, so a real GPU is slower; read the numbers as the ordering and the size of the gaps, not as
measurements. The hardware figures (``H100``) are the public H100 SXM specifications; the launch overhead is the
order of one eager PyTorch op on a GPU (CPU dispatch plus launch latency, a few microseconds), an assumption that
``--launch-us`` can change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mora_kernels import MoRALinear, fused, reference
from mora_kernels.core import Geometry, MoRAType

from .original import OriginalMoRALinear
from .providers import FusedLoRALinear, peft_lora

aten = torch.ops.aten


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes/s of HBM
    peak_flops: dict  # dtype -> dense FLOP/s of a matrix product in that dtype
    launch_s: float

    def describe(self) -> str:
        flops = ", ".join(f"{str(d).removeprefix('torch.')} {f / 1e12:g} TFLOP/s" for d, f in self.peak_flops.items())
        return f"{self.name}: {self.bandwidth / 1e12:g} TB/s HBM, {flops}, {self.launch_s * 1e6:g} us per launch"


def h100(launch_us: float = 4.0) -> Hardware:
    """H100 SXM: 3.35 TB/s HBM3; ~800 TFLOP/s bf16/fp16 dense (spec 989); for a fused op with a float32 M, 3xTF32
    (the triton backend's float32 products: three TF32 tensor-core products each) at a third of TF32's ~400 (spec
    495, derated alike), ~133; fp32 without TF32 67 TFLOP/s (PyTorch's default for float32 matmuls, which is what
    an fp32 adapter product in eager PyTorch runs as); fp64 tensor cores 67 TFLOP/s."""
    return Hardware(
        "H100 SXM (model)",
        3.35e12,
        {torch.bfloat16: 800e12, torch.float16: 800e12, "tf32x3": 400e12 / 3, torch.float32: 67e12,
         torch.float64: 67e12},
        launch_us * 1e-6,
    )


def h200(launch_us: float = 4.0) -> Hardware:
    """H200 (the GPU machine of this project): 4.3 TB/s, the device-to-device copy rate measured through PyTorch
    on it (bytes read + written; spec 4.8 TB/s HBM3e), and 790 TFLOP/s bf16/fp16, measured on an 8192^3 matmul; the
    H100's compute die, so TF32 (hence 3xTF32), fp32 and fp64 rates as ``h100``."""
    return Hardware(
        "H200 (model)",
        4.3e12,
        {torch.bfloat16: 790e12, torch.float16: 790e12, "tf32x3": 400e12 / 3, torch.float32: 67e12,
         torch.float64: 67e12},
        launch_us * 1e-6,
    )


def for_device(device: torch.device, launch_us: float = 4.0) -> Hardware:
    """The model of the GPU at hand where one is modelled (H200), else the H100's."""
    if device.type == "cuda" and "H200" in torch.cuda.get_device_properties(device).name:
        return h200(launch_us)
    return h100(launch_us)


# Ops that allocate or re-describe memory without running a kernel (views are found by ``func.is_view``).
NO_KERNEL = {
    aten._unsafe_view, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
    aten.lift_fresh, aten.detach,
}  # fmt: skip


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: elements along non-broadcast dims times element size."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            count *= size
    return count * t.element_size()


def matmul_flops(func, args) -> int:
    """2 M N K for (batched) matrix products and the modelled fused op, 0 for everything else (elementwise FLOPs
    are negligible here; a backend's own custom ops are counted as memory traffic only)."""
    packet = func.overloadpacket
    if packet is torch.ops.mora_bench.fused_forward:
        x, M, base, mora_type = args
        return _products(x, M, base.shape[-1], mora_type)
    if packet is torch.ops.mora_bench.fused_backward:  # dM and dx: two products of the forward's size
        g, x, M, mora_type = args
        return 2 * _products(x, M, g.shape[-1], mora_type)
    if packet in (aten.mm, aten.bmm):
        a, b = args[0], args[1]
    elif packet in (aten.addmm, aten.baddbmm):
        a, b = args[1], args[2]
    else:
        return 0
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


@dataclass
class OpRecord:
    op: str
    read: int
    written: int
    flops: int
    dtype: torch.dtype | str  # "tf32x3": a float32 product as three TF32 tensor-core products


@dataclass
class Count:
    ops: list = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.ops)

    @property
    def bytes(self) -> int:
        return sum(o.read + o.written for o in self.ops)

    @property
    def flops(self) -> int:
        return sum(o.flops for o in self.ops)

    def seconds(self, hw: Hardware) -> float:
        total = 0.0
        for o in self.ops:
            compute = o.flops / hw.peak_flops.get(o.dtype, min(hw.peak_flops.values())) if o.flops else 0.0
            total += max((o.read + o.written) / hw.bandwidth, compute) + hw.launch_s
        return total

    def summary(self, hw: Hardware) -> dict:
        return {
            "launches": self.launches, "bytes": self.bytes, "flops": self.flops, "model_us": self.seconds(hw) * 1e6,
            "ops": sorted({o.op for o in self.ops}),
        }  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Records the kernel-launching ops run under it (see the module docstring for what counts)."""

    def __init__(self, count: Count, custom_flops=None):
        super().__init__()
        self.count = count
        self.custom_flops = custom_flops  # (func, args) -> FLOPs of an op outside aten, or None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in NO_KERNEL:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        dtype = inputs[0].dtype if inputs else outputs[0].dtype
        if func.namespace != "aten" and any(t.dtype == torch.float32 for t in inputs):
            dtype = "tf32x3"  # a fused kernel multiplies a float32 M as 3xTF32 on tensor cores (the triton backend)
        self.count.ops.append(
            OpRecord(
                f"{func.namespace}.{func.overloadpacket.__name__}",
                sum(map(tensor_bytes, inputs)),
                sum(map(tensor_bytes, outputs)),
                self._flops(func, args),
                dtype,
            )
        )
        return out

    def _flops(self, func, args) -> int:
        if self.custom_flops is not None and func.namespace not in ("aten", "mora_bench"):
            return self.custom_flops(func, args)
        return matmul_flops(func, args)


# ---- the fused op, modelled when no fused backend can be counted here ------------------------------------------
# One custom op per direction, with the inputs and outputs a fused kernel must have: forward reads x, M and the base
# output and writes the result once; backward reads g, x and M and writes dx and dM. Its CPU implementation is the
# reference, so it is a correct op, not a stand-in that computes something else.


def _geometry(x, M, m, mora_type) -> Geometry:
    return Geometry(x.shape[-1], m, M.shape[0], MoRAType(mora_type))


def _products(x, M, m, mora_type) -> int:
    """FLOPs of ``M`` applied to every row's compressed vector (types 1-4) or to each used block (types 6/7)."""
    geo = _geometry(x, M, m, mora_type)
    vectors = geo.used_blocks if geo.t.blockwise else 1
    return 2 * (x.numel() // geo.n) * vectors * geo.R * geo.R


@torch.library.custom_op("mora_bench::fused_forward", mutates_args=())
def fused_forward(x: torch.Tensor, M: torch.Tensor, base: torch.Tensor, mora_type: int) -> torch.Tensor:
    return reference.forward(x, M, _geometry(x, M, base.shape[-1], mora_type), None, 1.0, base)


@fused_forward.register_fake
def _(x, M, base, mora_type):
    return torch.empty_like(base)


@torch.library.custom_op("mora_bench::fused_backward", mutates_args=())
def fused_backward(
    g: torch.Tensor, x: torch.Tensor, M: torch.Tensor, mora_type: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.backward(g, x, M, _geometry(x, M, g.shape[-1], mora_type))


@fused_backward.register_fake
def _(g, x, M, mora_type):
    return torch.empty_like(x), torch.empty_like(M)


def _setup(ctx, inputs, output):
    x, M, _base, mora_type = inputs
    ctx.save_for_backward(x, M)
    ctx.mora_type = mora_type


def _backward(ctx, g):
    x, M = ctx.saved_tensors
    dx, dM = fused_backward(g, x, M, ctx.mora_type)
    return dx, dM, g, None


fused_forward.register_autograd(_backward, setup_context=_setup)


class FusedModel(nn.Module):
    """A MoRALinear whose update is the modelled fused op (``counted_as = "analytic fused op"``)."""

    def __init__(self, layer: MoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return fused_forward(x, self.layer.M, self.layer.base(x), int(self.layer.mora_type))


class BackendModel(nn.Module):
    """A MoRALinear whose update runs ``backend``'s fused ops (``mora_kernels.fused``, their fake kernels on meta).

    A backend op's FLOPs are not visible from outside, so they are the MoRA products of the layer's geometry: one
    set for an op whose name says forward, two (dx and dM) for one whose name says backward.
    """

    def __init__(self, layer: MoRALinear, backend: str):
        super().__init__()
        self.layer, self.backend = layer, backend

    def custom_flops(self, func, args) -> int:
        geo = self.layer.geo
        vectors = geo.used_blocks if geo.t.blockwise else 1
        rows = args[0].numel() // args[0].shape[-1]
        products = 2 * rows * vectors * geo.R * geo.R
        name = func.overloadpacket.__name__
        return 2 * products if "backward" in name else products if "forward" in name else 0

    def forward(self, x):
        lay = self.layer
        return fused.apply(x, lay.M, lay.geo, lay.rope, lay.scaling, lay.base(x), backend=self.backend)


def count(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, mode: str) -> Count:
    """Ops of ``mode`` ("forward", "backward" or "forward+backward") of ``layer`` on ``x`` with upstream ``g``."""
    result = Count()
    custom_flops = getattr(layer, "custom_flops", None)
    x.grad = None  # accumulating into an existing .grad would add a launch that a training step does not have
    for p in layer.parameters():
        p.grad = None
    if mode == "backward":
        y = layer(x)
        with OpCounter(result, custom_flops):
            y.backward(g)
    else:
        with OpCounter(result, custom_flops):
            y = layer(x)
            if mode == "forward+backward":
                y.backward(g)
    return result


def fused_backend_model(layer: MoRALinear, x: torch.Tensor, g: torch.Tensor) -> tuple[nn.Module, str]:
    """The fused provider to count: the triton backend's own ops when they run on meta, else the analytic op."""
    try:
        model = BackendModel(layer, "triton")
        count(model, x, g, "forward+backward")  # does it trace on meta tensors?
        return model, "triton backend ops (fake kernels)"
    except Exception as error:  # noqa: BLE001 - any failure means: not countable here, say why
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
        return FusedModel(layer), f"analytic fused op (triton ops not countable here: {reason})"


def model_rows(n: int, m: int, r: int, tokens: int, mora_types, hw: Hardware, dtype=torch.bfloat16) -> list[dict]:
    """Modelled launches, bytes and H100 time of every provider and mode for one shape, on meta tensors."""
    device = torch.device("meta")
    base = nn.Linear(n, m, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.empty(tokens, n, device=device, dtype=dtype, requires_grad=True)
    g = torch.empty(tokens, m, device=device, dtype=dtype)
    models = [("base Linear", base, "aten ops"), ("LoRA fused addmm", FusedLoRALinear(base, r), "aten ops")]
    try:
        models.insert(1, ("LoRA PEFT", peft_lora(base, r), "aten ops"))
    except ImportError:
        pass  # the measured table says why PEFT is missing
    for t in mora_types:
        models.append((f"MoRA-{t} original", OriginalMoRALinear(base, r, t), "aten ops"))
        reference_layer = MoRALinear(base, r, t, backend="reference")
        models.append((f"MoRA-{t} reference", reference_layer, "aten ops"))
        fused, how = fused_backend_model(reference_layer, x, g)
        models.append((f"MoRA-{t} fused", fused, how))
    rows = []
    for name, layer, how in models:
        for mode in ("forward", "backward", "forward+backward"):
            c = count(layer, x, g, mode)
            rows.append({"provider": name, "mode": mode, "counted_as": how, **c.summary(hw)})
    return rows
