"""An EMA for an ordinary ``nn.Module`` trained with a ``torch.optim`` optimizer.

The four things most users need, in order:

1. ``fe.update(state, model.state_dict(), donate=True)`` after each optimizer step: the EMA of
   the float parameters and buffers (integer buffers are copied) is updated in place
   (``donate=True``), so no new tensors are allocated per step.
2. ``with fe.swapped(model, state):`` evaluates the module with the EMA weights and always puts
   the live weights back, even if evaluation raises.
3. ``fe.save(state, path)`` / ``fe.load(path, like=...)`` checkpoint the EMA (safetensors, no
   pickle, configuration included).
4. Resuming from the checkpoint gives exactly the EMA of an uninterrupted run.

Run::

    python examples/module_ema.py                   # 1000 steps into module_ema_out/, ~6 s
    python examples/module_ema.py --steps 400 --out /tmp/module_ema
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import funcema as fe


def make_problem(seed: int) -> tuple[torch.Tensor, ...]:
    """A noisy non-linear regression: y = sin(3 x0) + x1 * x2 + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 8, generator=g)
    y = torch.sin(3 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.3 * torch.randn(2048, 1, generator=g)
    return x[:1536], y[:1536], x[1536:], y[1536:]


def make_model() -> nn.Module:
    # LayerNorm is included so that the EMA also covers non-weight parameters.
    return nn.Sequential(nn.Linear(8, 64), nn.LayerNorm(64), nn.SiLU(), nn.Linear(64, 1))


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    state: fe.EmaState,
    data: tuple[torch.Tensor, ...],
    steps: range,
    seed: int,
) -> fe.EmaState:
    """Train over ``steps`` (global step numbers, so a resumed run draws the same batches)."""
    x_train, y_train = data[0], data[1]
    for step in steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # batch depends on the step only
        idx = torch.randint(len(x_train), (64,), generator=g)
        loss = F.mse_loss(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # donate=True: update the EMA's tensors in place; the old `state` is consumed.
        state = fe.update(state, model.state_dict(), donate=True)
    return state


@torch.no_grad()
def val_loss(model: nn.Module, data: tuple[torch.Tensor, ...]) -> float:
    model.eval()
    loss = F.mse_loss(model(data[2]), data[3]).item()
    model.train()
    return loss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=Path("module_ema_out"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1, see train_digits.py)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        summary = run(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process, by the tests
    print(f"wall time {time.perf_counter() - start:.1f} s ({args.threads} CPU thread(s))")
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_problem(args.seed)
    half = args.steps // 2

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, fe.EmaState]:
        torch.manual_seed(args.seed)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        state = fe.init(model.state_dict(), schedule=fe.schedules.warmup(max_decay=0.995))
        return model, opt, state

    # 1. Uninterrupted run.
    model, opt, state = fresh()
    state = train(model, opt, state, data, range(1, args.steps + 1), args.seed)
    live = val_loss(model, data)
    with fe.swapped(model, state):  # the module holds the EMA weights inside this block only
        averaged = val_loss(model, data)
    print(f"validation MSE: live weights {live:.4f}, EMA weights {averaged:.4f}")

    # 2. The same run, checkpointed half way and resumed in fresh objects.
    model2, opt2, state2 = fresh()
    state2 = train(model2, opt2, state2, data, range(1, half + 1), args.seed)
    ckpt = args.out / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, ckpt / "train.pt")
    fe.save(state2, ckpt / "ema.safetensors")
    del model2, opt2, state2

    model3, opt3, state3 = fresh()  # `state3` only gives the structure to load into
    train_ckpt = torch.load(ckpt / "train.pt", weights_only=True)
    model3.load_state_dict(train_ckpt["model"])
    opt3.load_state_dict(train_ckpt["opt"])
    state3 = fe.load(ckpt / "ema.safetensors", like=model3.state_dict())
    state3 = train(model3, opt3, state3, data, range(half + 1, args.steps + 1), args.seed)

    max_diff = max((a - b).abs().max().item() for a, b in zip(state.ema.values(), state3.ema.values()))
    identical = all(torch.equal(a, b) for a, b in zip(state.ema.values(), state3.ema.values()))
    print(f"resumed EMA == uninterrupted EMA: {identical} (max abs difference {max_diff:.3g})")
    print(f"steps: uninterrupted {int(state.step)}, resumed {int(state3.step)}")

    summary = {
        "live_val_mse": live,
        "ema_val_mse": averaged,
        "resumed_identical": identical,
        "resumed_max_abs_diff": max_diff,
        "step": int(state3.step),
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
