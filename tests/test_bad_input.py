"""Bad input raises ValueError or TypeError whose message names the argument and what was expected."""

import pytest
import torch
from torch import nn

import mora_kernels as mk
from mora_kernels import MoRALinear

X = torch.randn(2, 40)
M16 = torch.zeros(16, 16)
M15 = torch.zeros(15, 15)


class Int8Linear(nn.Linear):
    """Stands in for a quantized layer: an nn.Linear subclass with a packed integer weight."""

    def __init__(self):
        super().__init__(40, 24)
        self.weight = nn.Parameter(torch.zeros(24, 40, dtype=torch.int8), requires_grad=False)


def _same():
    """x passed as its own base: in place it would be written while read."""
    x = torch.zeros(2, 24)
    return mk.mora(x, M16, 24, 1, base=x, inplace=True)


def _peft():
    pytest.importorskip("peft")  # the row skips, not fails, where peft is not installed
    import mora_kernels.peft_integration as mkp

    return mkp


CASES = {
    "x not a tensor": (lambda: mk.mora([1.0] * 40, M16, 24, 1), TypeError, "x must be a torch.Tensor"),
    "integer x": (lambda: mk.mora(torch.ones(2, 40, dtype=torch.int64), M16, 24, 1), TypeError, "x must be float64"),
    "integer M": (lambda: mk.mora(X, torch.zeros(16, 16, dtype=torch.int32), 24, 1), TypeError, "M must be float64"),
    "scalar x": (lambda: mk.mora(torch.tensor(1.0), M16, 24, 1), ValueError,
                 r"x must have shape \(\.\.\., in_features\)"),
    "empty last dim": (lambda: mk.mora(torch.zeros(2, 0), M16, 24, 1), ValueError, "in_features >= 1"),
    "non-square M": (lambda: mk.mora(X, torch.zeros(16, 8), 24, 1), ValueError, r"M must be a square matrix \(R, R\)"),
    "3-d M": (lambda: mk.mora(X, torch.zeros(2, 4, 4), 24, 1), ValueError, "M must be a square matrix"),
    "odd R for type 6": (lambda: mk.mora(X, M15, 24, 6), ValueError, "needs an even square size R, got R=15"),
    "odd R for decoupled": (lambda: mk.mora(X, M15, 24, "decoupled"), ValueError, "even square size"),
    "unknown type": (lambda: mk.mora(X, M16, 24, 5), ValueError, "mora_type must be one of 1, 2, 3, 4, 6"),
    "unknown type name": (lambda: mk.mora(X, M16, 24, "lora"), TypeError, "mora_type must be one of"),
    "float type": (lambda: mk.mora(X, M16, 24, 1.0), TypeError, "mora_type must be one of"),
    "out_features zero": (lambda: mk.mora(X, M16, 0, 1), ValueError, "out_features must be >= 1, got 0"),
    "out_features float": (lambda: mk.mora(X, M16, 24.0, 1), TypeError, "out_features must be a positive int"),
    "devices differ": (lambda: mk.mora(X, M16.to("meta"), 24, 1), ValueError, "x and M must be on the same device"),
    "base wrong shape": (lambda: mk.mora(X, M16, 24, 1, base=torch.zeros(2, 23)), ValueError,
                         r"base must have shape \(2, 24\)"),
    "base integer": (lambda: mk.mora(X, M16, 24, 1, base=torch.zeros(2, 24, dtype=torch.int64)), TypeError,
                     "base must be float64"),
    "base other device": (lambda: mk.mora(X, M16, 24, 1, base=torch.zeros(2, 24, device="meta")), ValueError,
                          "base must be on x's device"),
    "rope on type 1": (lambda: mk.mora(X, M16, 24, 1, rope=(torch.zeros(3, 16), torch.zeros(3, 16))), ValueError,
                       "rope tables are only used by type 6"),
    "rope wrong size": (lambda: mk.mora(X, M16, 24, 6, rope=(torch.zeros(3, 8), torch.zeros(3, 8))), ValueError,
                        r"rope cos must have shape \(>= 2, 16\)"),
    "rope float64": (lambda: mk.mora(X, M16, 24, 6, rope=(torch.zeros(3, 16).double(),) * 2), TypeError,
                     "rope cos must be a float32 tensor"),
    "inplace without base": (lambda: mk.mora(X, M16, 24, 1, inplace=True), ValueError, "inplace=True adds the "
                             "update into base: pass base="),
    "inplace under autograd": (lambda: mk.mora(X, torch.zeros(16, 16, requires_grad=True), 24, 1,
                                               base=torch.zeros(2, 24), inplace=True),
                               ValueError, "inplace=True writes into base, which autograd cannot differentiate"),
    "inplace base is x": (_same, ValueError, "base: inplace=True needs a base that does not share memory with x"),
    "inplace expanded base": (lambda: mk.mora(X, M16, 24, 1, base=torch.zeros(1, 24).expand(2, 24), inplace=True),
                              ValueError, "base: inplace=True needs a base whose elements do not overlap"),
    "scaling string": (lambda: mk.mora(X, M16, 24, 1, scaling="a"), TypeError, "scaling must be a real number"),
    "scaling nan": (lambda: mk.mora(X, M16, 24, 1, scaling=float("nan")), ValueError, "scaling must be finite"),
    "unknown backend": (lambda: mk.mora(X, M16, 24, 1, backend="jax"), ValueError, "backend must be one of"),
    "r zero": (lambda: mk.r_hat(40, 24, 0, 1), ValueError, "r must be >= 1, got 0"),
    "r negative": (lambda: MoRALinear(nn.Linear(40, 24), -2, 1), ValueError, "r must be >= 1, got -2"),
    "r float": (lambda: mk.r_hat(40, 24, 2.5, 1), TypeError, "r must be a positive int"),
    "r too small for type 6": (lambda: mk.r_hat(1, 1, 1, 6), ValueError, "rotation blocks need an even size >= 2"),
    "in_features zero": (lambda: mk.delta_weight(M16, 0, 24, 1), ValueError, "in_features must be >= 1"),
    "delta_weight non-square": (lambda: mk.delta_weight(torch.zeros(3, 4), 40, 24, 1), ValueError,
                                "M must be a square matrix"),
    "layer: wrong last dim": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1)(torch.zeros(2, 39)), ValueError,
                              r"x must have shape \(\.\.\., in_features=40\), got \(2, 39\)"),
    "layer: base not Linear": (lambda: MoRALinear(nn.Conv1d(4, 4, 1), 4, 1), TypeError,
                               "base must be a torch.nn.Linear"),
    "layer: quantized base": (lambda: MoRALinear(Int8Linear(), 4, 1), TypeError, "quantized layers are not supported"),
    "layer: dropout 1": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1, dropout=1.0), ValueError,
                         r"dropout must be in \[0, 1\)"),
    "MoRAConfig: lora_dropout 1": (lambda: _peft().MoRAConfig(r=2, lora_dropout=1.0), ValueError,
                                   r"lora_dropout must be in \[0, 1\)"),
    "layer: x not a tensor": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1)([0.0] * 40), TypeError,
                              "x must be a torch.Tensor, got list"),
    "layer: integer x": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1)(torch.ones(2, 40, dtype=torch.int64)),
                         TypeError, "x must be float64, float32, float16 or bfloat16, got torch.int64"),
    "layer: scaling string": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1, scaling="2"), TypeError,
                              "scaling must be a real number"),
    "layer: scaling inf": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1, scaling=float("inf")), ValueError,
                           "scaling must be finite"),
    "layer: dropout string": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1, dropout="0.1"), TypeError,
                              r"dropout must be a float in \[0, 1\)"),
    "layer: dropout nan": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1, dropout=float("nan")), ValueError,
                           r"dropout must be in \[0, 1\)"),
    "add_adapter: scaling nan": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1).add_adapter("b", 4, scaling=float("nan")),
                                 ValueError, "scaling must be finite"),
    "apply_mora: dropout bool": (lambda: mk.apply_mora(nn.Sequential(nn.Linear(40, 24)), ["0"], 4, dropout=True),
                                 TypeError, "dropout must be a float"),
    "apply_mora: bad regex": (lambda: mk.apply_mora(nn.Sequential(nn.Linear(40, 24)), "q_proj(", 4), ValueError,
                              "target_modules: 'q_proj\\(' is not a valid regex"),
    "apply_mora: int target": (lambda: mk.apply_mora(nn.Sequential(nn.Linear(40, 24)), 0, 4), TypeError,
                               "target_modules must be a regex str or a list of module names, got 0"),
    "apply_mora: int in targets": (lambda: mk.apply_mora(nn.Sequential(nn.Linear(40, 24)), ["0", 2], 4), TypeError,
                                   r"target_modules: module names must be str, got \[2\]"),
    "load_state_dict: int64 M": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1).load_state_dict(
        {"M": torch.zeros(16, 16, dtype=torch.int64)}, strict=False), TypeError,
        "M must be float64, float32, float16 or bfloat16, got torch.int64"),
    "load_state_dict: int64 adapter key": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1).load_state_dict(
        {"adapters.default.weight": torch.zeros(16, 16, dtype=torch.int64)}, strict=False), TypeError,
        "adapters.default.weight must be float64"),
    "layer: integer M dtype": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1, dtype=torch.int32), TypeError,
                               "dtype must be float64"),
    "layer: unknown backend": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1, backend="tpu"), ValueError,
                               "backend must be one of"),
    "sparse x": (lambda: mk.mora(X.to_sparse(), M16, 24, 1), TypeError, "x must be a dense"),
    "sparse M": (lambda: mk.mora(X, M16.to_sparse(), 24, 1), TypeError, "M must be a dense"),
    "sparse base": (lambda: mk.mora(X, M16, 24, 1, base=torch.zeros(2, 24).to_sparse()), TypeError,
                    "base must be a dense"),
    "delta_weight: sparse M": (lambda: mk.delta_weight(M16.to_sparse(), 40, 24, 1), TypeError, "M must be a dense"),
    "layer: x on another device": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1)(X.to("meta")), ValueError,
                                   "x must be on the layer's device cpu"),
    "layer: x of another dtype": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1)(X.double()), TypeError,
                                  "x must have the base layer's dtype torch.float32"),
    "layer: sparse x": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1)(X.to_sparse()), TypeError, "x must be a dense"),
    "superscript type": (lambda: mk.mora(X, M16, 24, "²"), TypeError, "mora_type must be one of"),
    "Arabic-Indic digit type": (lambda: mk.r_hat(40, 24, 2, "\u0663"), TypeError, "mora_type must be one of"),
    "out_features beyond int64": (lambda: mk.mora(X, M16, 2**64, 1), ValueError, "out_features must be <= 2"),
    "r beyond int64": (lambda: mk.r_hat(40, 24, 2**63, 1), ValueError, "r must be <= 2"),
    "in_features beyond int64": (lambda: mk.delta_weight(M16, 2**70, 24, 1), ValueError, "in_features must be <= 2"),
    "inplace as_strided rows overlap": (
        lambda: mk.mora(X, M16, 24, 1, base=torch.zeros(100).as_strided((2, 24), (12, 1)), inplace=True),
        ValueError, "base: inplace=True needs a base whose elements do not overlap"),
    "layer: set_adapter None": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1).set_adapter(None), TypeError,
                                "names must be an adapter name"),
    "layer: add_adapter int name": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1).add_adapter(3, 4), TypeError,
                                    "adapter_name: an adapter name must be a str"),
    "set_adapter None": (lambda: mk.set_adapter(mk.apply_mora(nn.Sequential(nn.Linear(40, 24)), ["0"], 4), None),
                         TypeError, "adapter_name must be an adapter name"),
    "ReMoRA optimizer": (lambda: _remora().ReMoRA(nn.Linear(2, 2), 1, optimizer=object()), TypeError,
                         "optimizer must be a torch.optim.Optimizer"),
    "backend_status: bad device": (lambda: mk.backend_status("triton", "gpu9"), ValueError,
                                   "device must be a torch.device"),
    "save_adapter: path an int": (lambda: mk.save_adapter(mk.apply_mora(nn.Sequential(nn.Linear(40, 24)), ["0"], 4), 3),
                                  TypeError, "path must be a str"),
    "inplace not a bool": (lambda: mk.mora(X, M16, 24, 1, base=torch.zeros(2, 24), inplace=torch.ones(2)), TypeError,
                           "inplace must be a bool"),
    "layer: merge adapter_names a dict": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1).merge(adapter_names={}),
                                          TypeError, "adapter_names must be"),
    "layer: delta_weight of an unknown adapter": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1).delta_weight("x"),
                                                  ValueError, "adapter_name: unknown adapter 'x'"),
    "layer: enable_adapters a tensor": (lambda: MoRALinear(nn.Linear(40, 24), 4, 1).enable_adapters(torch.ones(2)),
                                        TypeError, "enabled must be a bool"),
    "load_adapter path None": (lambda: mk.load_adapter(nn.Linear(2, 2), None), TypeError, "path must be a str"),
}


def _remora():
    import mora_kernels.remora as remora

    return remora


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_clear_error(name):
    call, error, message = CASES[name]
    with pytest.raises(error, match=message):
        call()


def test_explicit_backend_that_cannot_run_says_why():
    usable, reason = mk.backend_status("cuda", "cpu")
    assert not usable and reason
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu"):
        mk.mora(X, M16, 24, 1, backend="cuda")
