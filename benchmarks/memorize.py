"""The MoRA paper's memorization experiment, at a scale a 2-core CPU runs in minutes.

The paper's claim (Jiang et al. 2024, section 4.1): with the same trainable parameters, MoRA memorizes new
key-value knowledge clearly better than LoRA and comes close to full fine-tuning, because its update has a high
rank. Here: a tiny Llama (``transformers.LlamaConfig``, random initialisation, optionally pre-trained briefly on other
random pairs, then frozen) learns N random
uuid4-style ``key:value`` pairs (hex digits drawn from a seeded RNG, version and variant digits as in uuid4),
character-level, with the loss on the value and end token only. The same linear layers of every decoder block
(q, k, v, o, gate, up, down) are adapted by: MoRA type 1 and type 6 (``mora_kernels.replace_linears``), LoRA of
rank r (PEFT, alpha = r so its scaling is 1 as MoRA's) with the same trainable parameter count, full fine-tuning
of the same weights, and QMoRA: MoRA type 6 on those layers quantized to 4 bits (bitsandbytes nf4 with double
quantization, QLoRA's format).

Each method trains with AdamW at each learning rate of its sweep (MoRA's M and LoRA's B start at zero, so their
good rates differ from full fine-tuning's); the best rate per method (final exact match, then final loss) is
reported and every run is kept in the JSON. Exact match: the greedy (argmax) prediction of every value character
and the end token given the key and the correct prefix is right, which is the same as greedy decoding reproducing
the value exactly.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from mora_kernels import replace_linears

from .bench_layers import environment

HEX = "0123456789abcdef"
VOCAB = HEX + "-:"
BOS, EOS = len(VOCAB), len(VOCAB) + 1
KEY_LEN = 36
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("mora1", "mora6", "lora", "full", "qmora6")
LABELS = {"mora1": "MoRA type 1", "mora6": "MoRA type 6", "lora": "LoRA (PEFT)", "full": "full fine-tuning",
          "qmora6": "QMoRA type 6 (nf4)"}  # fmt: skip

# Scale. Defaults take about 9 minutes on 2 idle CPU cores (427 s measured for the 18 runs of the first 4 methods,
# 3-5 learning rates each; QMoRA adds 3 runs of about 35 s); --quick takes seconds.
# No pre-training by default: 200 steps of it (--pretrain-steps 200) left every method learning far slower in a trial
# (full fine-tuning 39% of value characters right after 250 steps, against 97% from the random model).
DEFAULT = {"pairs": 64, "steps": 600, "r": 4, "hidden": 64, "intermediate": 128, "layers": 2, "heads": 4,
           "batch": 32, "eval_every": 50, "pretrain_pairs": 1024, "pretrain_steps": 0}  # fmt: skip
# GPU scale (--scale gpu): 8x the pairs on a 4-layer hidden-256 Llama, r = 8; each run is launch-bound on a GPU
# (tiny matrices), so the sweep is what a time budget cuts (runs start in the order of ``job_order``).
GPU = {"pairs": 512, "steps": 1200, "r": 8, "hidden": 256, "intermediate": 688, "layers": 4, "heads": 4,
       "batch": 64, "eval_every": 100, "pretrain_pairs": 1024, "pretrain_steps": 0}  # fmt: skip
QUICK = {"pairs": 8, "steps": 6, "r": 4, "hidden": 32, "intermediate": 64, "layers": 1, "heads": 2, "batch": 8,
         "eval_every": 3, "pretrain_pairs": 16, "pretrain_steps": 4}  # fmt: skip
# Learning-rate sweeps, rates a factor ~3 apart; the best of each method is reported. The zero-initialised adapters
# get five rates because in a first run with three (3e-3 to 3e-2) MoRA-1 and LoRA were best at the lowest and MoRA-6
# at the highest; full fine-tuning memorized everything at each of its three.
ADAPTER_RATES = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
# QMoRA gets the three rates around MoRA type 6's best (3e-2), to keep the default run within about 9 minutes.
SWEEP = {"mora1": ADAPTER_RATES, "mora6": ADAPTER_RATES, "lora": ADAPTER_RATES, "full": [1e-3, 3e-3, 1e-2],
         "qmora6": [1e-2, 3e-2, 1e-1]}  # fmt: skip
QUICK_SWEEP = {m: [3e-3] for m in METHODS}


def job_order(methods, sweep) -> list[tuple[str, float]]:
    """(method, lr) runs, every method's middle rate first and then outwards, methods interleaved, so that a time
    budget that stops early still leaves each method its likeliest rates."""
    def middle_out(rates):
        mid = len(rates) // 2
        return sorted(rates, key=lambda lr: abs(rates.index(lr) - mid) + 0.5 * (rates.index(lr) < mid))

    ordered = {m: middle_out(list(sweep[m])) for m in methods}
    return [(m, ordered[m][i]) for i in range(max(map(len, ordered.values()))) for m in methods if i < len(ordered[m])]


def uuid_like(rng: random.Random) -> str:
    """A uuid4-shaped string from ``rng``: 32 hex digits, version digit 4, variant digit in 8-b."""
    digits = [rng.choice(HEX) for _ in range(32)]
    digits[12] = "4"
    digits[16] = rng.choice("89ab")
    s = "".join(digits)
    return f"{s[:8]}-{s[8:12]}-{s[12:16]}-{s[16:20]}-{s[20:]}"


def make_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    keys = set()
    while len(keys) < count:
        keys.add(uuid_like(rng))
    return [(k, uuid_like(rng)) for k in sorted(keys)]


def encode(pairs) -> torch.Tensor:
    """``(N, 75)`` token ids: BOS, key (36), ':', value (36), EOS."""
    index = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([[BOS, *(index[c] for c in f"{k}:{v}"), EOS] for k, v in pairs])


def base_model(scale: dict, seed: int) -> nn.Module:
    """A tiny random Llama, optionally pre-trained briefly on other random pairs (the format, not the pairs), frozen.

    From random initialisation the frozen output head and final norm keep the logits small (init std 0.02), so the
    loss stays high even when the argmax is right; accuracy, not loss, is the measure that compares methods."""
    model = _llama(scale, seed)
    if not scale["pretrain_steps"]:
        return model.eval().requires_grad_(False)
    tokens = encode(make_pairs(scale["pretrain_pairs"], seed + 1))  # disjoint from make_pairs(..., seed) in practice
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(scale["pretrain_steps"]):
        batch = torch.randint(len(tokens), (scale["batch"],), generator=generator)
        loss = model(input_ids=tokens[batch], labels=tokens[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def _llama(scale: dict, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB) + 2, hidden_size=scale["hidden"], intermediate_size=scale["intermediate"],
        num_hidden_layers=scale["layers"], num_attention_heads=scale["heads"], num_key_value_heads=scale["heads"],
        max_position_embeddings=2 * KEY_LEN + 8, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def adapt(model: nn.Module, method: str, r: int) -> nn.Module:
    """A copy of the frozen ``model`` with ``method``'s trainable parameters on the target layers."""
    model = copy.deepcopy(model)
    if method == "qmora6":
        from .providers import quantized_copy

        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                model.set_submodule(name, quantized_copy(module, "nf4-dq"))
    if method in ("mora1", "mora6", "qmora6"):
        replace_linears(model, TARGETS, r, mora_type=int(method[-1]))
    elif method == "lora":
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS)
        model = peft.get_peft_model(model, config)
    elif method == "full":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                module.weight.requires_grad_(True)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return model


def evaluate(model, tokens) -> tuple[float, float, float]:
    """(loss, token accuracy, exact match) on the value characters and end token."""
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, KEY_LEN + 1 : -1]
    target = tokens[:, KEY_LEN + 2 :]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).item()
    right = logits.argmax(-1) == target
    return loss, right.float().mean().item(), right.all(-1).float().mean().item()


def train(model, tokens, lr: float, scale: dict, seed: int, tick=None) -> dict:
    """AdamW, linear warm-up over 5% of the steps then cosine decay to 10%; minibatches reshuffled every epoch;
    ``tick()`` after each step (progress)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps, warm = scale["steps"], max(1, scale["steps"] // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))),
    )  # fmt: skip
    labels = tokens.clone()
    labels[:, : KEY_LEN + 2] = -100  # loss on the value characters and the end token only
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same batches on every device
    order, position = torch.randperm(len(tokens), generator=generator), 0
    curve = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": [], "token_acc": [], "exact_match": []}
    model.train()
    for step in range(1, steps + 1):
        if position >= len(order):
            order, position = torch.randperm(len(tokens), generator=generator), 0
        batch = order[position : position + scale["batch"]]
        position += scale["batch"]
        loss = model(input_ids=tokens[batch], labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if tick is not None:
            tick()
        curve["step"].append(step)
        curve["train_loss"].append(loss.item())
        if step % scale["eval_every"] == 0 or step == steps:
            model.eval()
            ev = evaluate(model, tokens)
            model.train()
            curve["eval_step"].append(step)
            for k, v in zip(("eval_loss", "token_acc", "exact_match"), ev):
                curve[k].append(v)
    model.eval()
    return curve


def compact(value):
    """Floats to 5 significant digits, so the per-step curves of every run stay a small file."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def plot(result: dict, path: Path) -> None:
    import matplotlib

    from .bench_layers import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_sweep) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (method, best) in enumerate(result["best"].items()):
        run, color = best["curve"], f"C{i}"
        label = f"{LABELS[method]} (lr {best['lr']:g}, {best['trainable_params']:,} params)"
        ax_loss.plot(run["eval_step"], run["eval_loss"], color=color, label=label)
        ax_acc.plot(run["eval_step"], [100 * a for a in run["exact_match"]], color=color,
                    label=f"{LABELS[method]} exact")
        ax_acc.plot(run["eval_step"], [100 * a for a in run["token_acc"]], "--", color=color, label="  token accuracy")
        sweep = [r for r in result["runs"] if r["method"] == method]
        lrs = [r["lr"] for r in sweep]
        ax_sweep.plot(lrs, [100 * r["final"]["exact_match"] for r in sweep], "o-", color=color,
                      label=f"{LABELS[method]} exact")
        ax_sweep.plot(lrs, [100 * r["final"]["token_acc"] for r in sweep], "s--", color=color, label="  token accuracy")
    ax_loss.set(xlabel="step", ylabel="loss on values (all pairs)", yscale="log", title="loss, best lr per method")
    ax_acc.set(xlabel="step", ylabel="%", title="exact match (solid) and token accuracy (dashed) of values")
    ax_sweep.set(xlabel="learning rate", ylabel="final %", xscale="log", title="learning-rate sweep (final values)")
    for ax in (ax_loss, ax_acc, ax_sweep):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    s = result["scale"]
    fig.suptitle(
        f"Memorizing {s['pairs']} random uuid key:value pairs; frozen tiny Llama (hidden {s['hidden']}, "
        f"{s['layers']} layers, {s['pretrain_steps']} pre-training steps), adapters on all 7 projections, "
        f"r={s['r']}; {result.get('device', 'cpu')}, {result['seconds']:.0f} s",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def summarize(runs: list[dict], methods) -> dict:
    """The best run of each method: final exact match, then final loss."""
    best = {}
    for method in methods:
        candidates = [r for r in runs if r["method"] == method]
        if candidates:
            best[method] = max(candidates, key=lambda r: (r["final"]["exact_match"], -r["final"]["eval_loss"]))
    return best


def main(args) -> int:
    """Runs the sweep into ``args.run_dir`` (a new folder made by the command line); memorize.json is rewritten
    whole after every finished run, so a run cut short keeps what it finished."""
    from .bench_layers import progress, write_atomic

    start = time.perf_counter()
    device = torch.device(args.device or "cpu")
    scale = dict(QUICK if args.quick else GPU if args.scale == "gpu" else DEFAULT)
    for key in ("pairs", "steps", "r", "pretrain_steps"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key)
    methods = args.methods or list(METHODS)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    sweep = QUICK_SWEEP if args.quick else SWEEP
    out = Path(args.run_dir)
    result = {
        "scale": scale, "seed": args.seed, "methods": methods, "sweep": {m: sweep[m] for m in methods},
        "model": "LlamaForCausalLM, random init, pre-trained on other random pairs for pretrain_steps steps (0: none), "
        "then frozen; character-level vocabulary of 20",
        "environment": environment(device),  # the commit that runs, not one made while it ran
        "device": str(device), "runs": [], "not_run_time_budget": [], "best": {}, "seconds": 0.0, "complete": False,
    }  # fmt: skip

    def save() -> None:
        result["best"] = summarize(result["runs"], methods)
        result["seconds"] = time.perf_counter() - start
        write_atomic(out / "memorize.json", json.dumps(compact(result)))

    tokens = encode(make_pairs(scale["pairs"], args.seed)).to(device)
    frozen = base_model(scale, args.seed).to(device)
    jobs = job_order(methods, sweep)
    bar = progress(len(jobs) * scale["steps"], "memorize (all runs)", getattr(args, "no_progress", False), "step")
    for method, lr in jobs:
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            result["not_run_time_budget"].append({"method": method, "lr": lr})  # out of time: said, not killed
            bar.update(scale["steps"])
            continue
        torch.manual_seed(args.seed)  # the same adapter initialisation (LoRA's A) for every learning rate
        model = adapt(frozen, method, scale["r"])
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t0 = time.perf_counter()
        curve = train(model, tokens, lr, scale, args.seed, tick=bar.update)
        final = {k: curve[k][-1] for k in ("eval_loss", "token_acc", "exact_match")}
        result["runs"].append({"method": method, "lr": lr, "trainable_params": params,
                               "seconds": time.perf_counter() - t0, "final": final, "curve": curve})  # fmt: skip
        save()
    bar.close()
    result["complete"] = True
    save()
    runs, best = result["runs"], result["best"]
    written = [out / "memorize.json"]
    if not getattr(args, "no_plot", False):
        plot(result, out / "memorize.png")
        written.append(out / "memorize.png")
    print(f"{scale['pairs']} pairs, {scale['steps']} steps, r={scale['r']}, model hidden {scale['hidden']} x "
          f"{scale['layers']} layers; {result['seconds']:.0f} s")  # fmt: skip
    print(f"{'method':<18}{'best lr':>9}{'params':>10}{'exact match':>13}{'token acc':>11}{'loss':>9}"
          "   sweep (lr: exact)")
    for method, run in best.items():
        f = run["final"]
        sweep_text = ", ".join(f"{r['lr']:g}: {100 * r['final']['exact_match']:.0f}%"
                               for r in runs if r["method"] == method)
        print(f"{LABELS[method]:<18}{run['lr']:>9g}{run['trainable_params']:>10,}{100 * f['exact_match']:>12.1f}%"
              f"{100 * f['token_acc']:>10.1f}%{f['eval_loss']:>9.4f}   {sweep_text}")  # fmt: skip
    print("wrote " + ", ".join(map(str, written)))
    return 0
