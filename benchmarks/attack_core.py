"""Attack funcema's core (init / update / swap and the functions that take a state) as a careless
or hostile user would, and count the outcomes per class of attack.

Every case calls the public API only, so the script runs against any funcema on the path (to
compare one commit with another). Each outcome is one of:

- **clear**: a `TypeError`, `ValueError` or `FloatingPointError` whose message names what was
  wrong (the leaf path, the argument) and, where the class says so, what to pass instead;
- **correct**: a legal input gave the right result (checked against an independent computation);
- **raw**: any other exception (a kernel's `NotImplementedError`, an `OverflowError`), or an
  error that does not say what is wrong or misleads (e.g. "wrap numbers with torch.tensor");
- **hang**: still running after 20 s (stopped by SIGALRM);
- **silent**: a wrong result without an error (a half-updated donated state that is still live,
  an EMA averaged twice, a finite update dropped, a consumed state accepted).

    PYTHONPATH=. python benchmarks/attack_core.py    # the markdown table of docs/reliability.md
"""

from __future__ import annotations

import signal
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import optree
import torch

import funcema as fe
from benchmarks.attack_report import print_table

TIMEOUT = 20
RESULTS: dict[str, Counter[str]] = {}
ERRORS = (TypeError, ValueError, FloatingPointError)


class Hang(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang


def judge(
    cls: str, call: Callable[[], Any], *, says: tuple[str, ...] = (), check: Callable[[Any], str] | None = None
) -> str:
    """Run one case. Without `check` the input is invalid: an error of `ERRORS` containing every
    string of `says` is clear. With `check`, the call's result (or the exception it raised) is given
    to `check`, which returns the outcome."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT)
    try:
        result: Any = call()
        outcome = "silent" if check is None else check(result)
    except Hang:
        outcome = "hang"
    except Exception as err:  # every exception is an outcome here
        if check is not None:
            outcome = check(err)
        else:
            outcome = "clear" if isinstance(err, ERRORS) and all(s in str(err) for s in says) else "raw"
    finally:
        signal.alarm(0)
    RESULTS.setdefault(cls, Counter())[outcome] += 1
    return outcome


def unsupported_leaves() -> dict[str, torch.Tensor]:
    leaves = {n: torch.zeros(3).to(getattr(torch, n)) for n in dir(torch) if n.startswith("float8_")}
    leaves["sparse_coo"] = torch.eye(3).to_sparse()
    leaves["sparse_csr"] = torch.eye(3).to_sparse_csr()
    leaves["sparse_csc"] = torch.eye(3).to_sparse_csc()
    leaves["quantized"] = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    leaves["nested"] = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    return leaves


def attack_unsupported_leaves() -> None:
    """Leaves no update can write, given to init (then updated pure and donated, both paths)."""
    for leaf in unsupported_leaves().values():
        for policy in ("propagate", "skip"):
            for donate in (False, True):

                def call(leaf: torch.Tensor = leaf, policy: str = policy, donate: bool = donate) -> Any:
                    state = fe.init({"enc": {"w": leaf}}, on_nonfinite=policy)
                    return fe.update(state, {"enc": {"w": leaf}}, donate=donate)

                judge("unsupported leaves (float8, sparse, nested, quantized) at init", call, says=("'enc.w'",))


def attack_options() -> None:
    """EMA dtypes without a lerp kernel and seeds out of range, on both update paths."""
    bad = [dict(dtype=getattr(torch, n)) for n in dir(torch) if n.startswith("float8_")] + [dict(dtype=torch.complex32)]
    bad += [dict(seed=2**63), dict(seed=2**64), dict(seed=-1)]
    for kwargs in bad:
        for policy in ("propagate", "skip"):
            leaf = torch.zeros(3, dtype=torch.complex64 if kwargs.get("dtype") == torch.complex32 else torch.float32)

            def call(kwargs: dict[str, Any] = kwargs, policy: str = policy, leaf: torch.Tensor = leaf) -> Any:
                return fe.update(fe.init({"w": leaf}, on_nonfinite=policy, **kwargs), {"w": leaf})

            judge("EMA dtype and seed out of range", call, says=(next(iter(kwargs)),))
    for seed in (2**62, 2**63 - 1):  # legal: both paths must work and round alike
        for policy in ("propagate", "skip"):

            def legal(seed: int = seed, policy: str = policy) -> Any:
                state = fe.init({"w": torch.randn(16)}, dtype=torch.bfloat16, seed=seed, on_nonfinite=policy)
                return fe.update(state, {"w": torch.randn(16)})

            judge(
                "EMA dtype and seed out of range",
                legal,
                check=lambda r: "correct" if isinstance(r, fe.EmaState) else "raw",
            )


def two_groups() -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(4), "b": torch.zeros(4, dtype=torch.float64)}


def attack_failed_updates() -> None:
    """A kernel failure after the first group's write, and rejected donated updates."""
    import funcema._kernels as kernels

    for policy in ("propagate", "skip"):
        for donate in (False, True):
            reals = {name: getattr(kernels, name) for name in ("lerp", "lerp_tensor_weight")}
            calls: list[int] = []

            def failing(real: Any, calls: list[int] = calls) -> Any:
                def fail_on_second_group(*args: Any, **kwargs: Any) -> Any:
                    calls.append(1)
                    if len(calls) == 2:
                        raise RuntimeError("injected kernel failure")
                    return real(*args, **kwargs)

                return fail_on_second_group

            state = fe.init(two_groups(), on_nonfinite=policy)
            before = [t.clone() for t in optree.tree_leaves(state.ema)]
            for name, real in reals.items():
                setattr(kernels, name, failing(real))
            try:

                def check(result: Any, state: fe.EmaState = state, before: list[torch.Tensor] = before) -> str:
                    unchanged = all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(state.ema), before))
                    consumed = int(state.step) == -1
                    if not isinstance(result, RuntimeError):
                        return "raw"  # the injected failure did not surface
                    return "correct" if (unchanged and int(state.step) == 0) or consumed else "silent"

                ones = {k: torch.ones_like(v) for k, v in two_groups().items()}
                judge(
                    "injected kernel failure mid-update",
                    lambda s=state, d=donate, p=ones: fe.update(s, p, donate=d),
                    check=check,
                )
            finally:
                for name, real in reals.items():
                    setattr(kernels, name, real)
    bad_inputs = {
        "shape": {"a": torch.zeros(5), "b": torch.zeros(4, dtype=torch.float64)},
        "sparse, same dtype": {"a": torch.zeros(4).to_sparse(), "b": torch.zeros(4, dtype=torch.float64)},
        "float8": {"a": torch.zeros(4, dtype=torch.float8_e4m3fn), "b": torch.zeros(4, dtype=torch.float64)},
        "nested": {"a": torch.nested.nested_tensor([torch.zeros(4)]), "b": torch.zeros(4, dtype=torch.float64)},
        "nan with raise": {"a": torch.zeros(4), "b": torch.full((4,), float("nan"), dtype=torch.float64)},
    }
    for label, bad in bad_inputs.items():
        for policy in ("propagate", "skip", "raise") if label != "nan with raise" else ("raise",):
            state = fe.init(two_groups(), on_nonfinite=policy)

            def check(result: Any, state: fe.EmaState = state) -> str:
                live = int(state.step) == 0 and all(
                    torch.equal(t, torch.zeros_like(t)) for t in optree.tree_leaves(state.ema)
                )
                if isinstance(result, ERRORS) and ("'a'" in str(result) or "'b'" in str(result)):
                    return "clear" if live else "silent"
                return "raw" if isinstance(result, BaseException) else "silent"

            judge("rejected donated update", lambda s=state, b=bad: fe.update(s, b, donate=True), check=check)


def attack_tied() -> None:
    """Tied weights: init from one tensor under two paths, and swap in of tied weights, then update."""
    for policy in ("propagate", "skip"):
        for dtype in (torch.float32, torch.bfloat16):
            for donate in (False, True):
                for route in ("swap", "init"):

                    def call(
                        policy: str = policy, dtype: torch.dtype = dtype, donate: bool = donate, route: str = route
                    ) -> Any:
                        tied = torch.full((8,), 2.0, dtype=dtype)
                        state = fe.init(
                            {"embed": torch.zeros(8, dtype=dtype), "head": torch.zeros(8, dtype=dtype)},
                            schedule=fe.schedules.constant(0.5),
                            on_nonfinite=policy,
                            dtype=dtype,
                        )
                        if route == "swap":
                            state, _ = fe.swap(state, {"embed": tied, "head": tied})
                        else:
                            state = fe.init(
                                {"embed": tied, "head": tied},
                                schedule=fe.schedules.constant(0.5),
                                on_nonfinite=policy,
                                dtype=dtype,
                            )
                        target = torch.full((8,), 4.0, dtype=dtype)
                        return fe.update(state, {"embed": target, "head": target}, donate=donate)

                    judge(
                        "tied / aliased EMA leaves",
                        call,
                        check=lambda r: (
                            "correct"
                            if isinstance(r, fe.EmaState)
                            and all(torch.equal(v.float(), torch.full((8,), 3.0)) for v in r.ema.values())
                            else "silent"
                        ),
                    )


def attack_nonfinite_skip() -> None:
    """Finite values near each dtype's maximum must count as finite under on_nonfinite='skip'."""
    cases = [
        (torch.float64, 1e300),
        (torch.float64, 1.7e308),
        (torch.complex128, 1e300),
        (torch.float16, 65504.0),
        (torch.bfloat16, 3.0e38),
        (torch.float32, 3.4e38),
    ]
    for dtype, value in cases:
        for donate in (False, True):

            def call(dtype: torch.dtype = dtype, value: float = value, donate: bool = donate) -> Any:
                state = fe.init(
                    {"w": torch.zeros(3, dtype=dtype)},
                    schedule=fe.schedules.constant(0.0),
                    on_nonfinite="skip",
                    dtype=dtype if dtype in (torch.float16, torch.bfloat16) else None,
                )
                return fe.update(state, {"w": torch.full((3,), value, dtype=dtype)}, donate=donate)

            judge(
                "finite extremes with on_nonfinite='skip'",
                call,
                check=lambda r: "correct" if isinstance(r, fe.EmaState) and int(r.nonfinite_count) == 0 else "silent",
            )


def mismatched_calls(n: int, directory: str) -> list[Callable[[], Any]]:
    """Calls with a tree of `n` leaves that does not match the state (every path renamed, a list,
    a leaf of another shape), for update, swap and load."""
    params = {f"layers.{i}.weight": torch.zeros(1) for i in range(n)}
    state = fe.init(params)
    renamed = {f"other.{i}": t for i, t in enumerate(params.values())}
    file = fe.save(state, f"{directory}/s{n}.safetensors")
    return [
        lambda: fe.update(state, renamed),
        lambda: fe.swap(state, renamed),
        lambda: fe.load(file, like=renamed),
        lambda: fe.update(state, list(params.values())),
        lambda: fe.update(state, {**params, "layers.0.weight": torch.zeros(2)}),
    ]


def attack_mismatches() -> None:
    """Trees that do not match the state, up to 100,000 leaves: a clear error listing the paths."""
    with tempfile.TemporaryDirectory() as d:
        for n in (10, 100_000):
            for call in mismatched_calls(n, d):
                judge("trees that do not match (10 and 100,000 leaves)", call, says=("layers.0.weight",))


def consumed() -> fe.EmaState:
    state = fe.init({"w": torch.zeros(3)})
    fe.update(state, {"w": torch.zeros(3)}, donate=True)
    return state


def attack_consumed() -> None:
    """Every function given a consumed (donated) state: the same message, nothing written."""
    with tempfile.TemporaryDirectory() as d:
        live_file = fe.save(fe.init({"w": torch.zeros(3)}), f"{d}/live.safetensors")
        ph = fe.posthoc.update(fe.posthoc.init({"w": torch.zeros(3)}), {"w": torch.ones(3)})
        fe.update(ph.emas[1], {"w": torch.ones(3)}, donate=True)  # a later member consumed
        skip_state = fe.init({"w": torch.zeros(3)}, on_nonfinite="skip")
        fe.update(skip_state, {"w": torch.zeros(3)}, donate=True)

        def swapped() -> None:
            with fe.swapped(torch.nn.Linear(3, 1), consumed()):
                pass

        calls = [
            lambda: fe.update(consumed(), {"w": torch.ones(3)}),
            lambda: fe.update(consumed(), {"w": torch.ones(3)}, donate=True),
            lambda: fe.update(skip_state, {"w": torch.ones(3)}),
            lambda: fe.swap(consumed(), {"w": torch.ones(3)}),
            swapped,
            lambda: fe.copy_to(torch.nn.Linear(3, 1), consumed()),
            lambda: fe.save(consumed(), f"{d}/c.safetensors"),
            lambda: fe.load(live_file, like=consumed()),
            lambda: fe.posthoc.update(ph, {"w": torch.ones(3)}),
            lambda: fe.posthoc.update(ph, {"w": torch.ones(3)}, donate=True),
            lambda: fe.posthoc.snapshot(ph, f"{d}/snaps"),
        ]
        for call in calls:
            judge("consumed (donated) state", call, says=("donate", "consumed"))


def attack_containers() -> None:
    """A module, a generator, a dict view or an unnamed parameter list instead of a tree of named tensors."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    state = fe.init(dict(model.named_parameters()))
    with tempfile.TemporaryDirectory() as d:
        file = fe.save(state, f"{d}/s.safetensors")
        givens = [
            lambda: model,
            lambda: model.parameters(),
            lambda: model.named_parameters(),
            lambda: model.state_dict().items(),
            lambda: list(model.parameters()),
        ]
        for i, given in enumerate(givens):
            calls = [
                lambda g=given: fe.update(state, g()),
                lambda g=given: fe.swap(state, g()),
                lambda g=given: fe.load(file, like=g()),
            ]
            if i < 4:  # a list of tensors is a valid tree for init
                calls.append(lambda g=given: fe.init(g()))
            for call in calls:
                judge("module / generator / unnamed list instead of named tensors", call, says=("named_parameters()",))


def attack_vmap() -> None:
    """torch.func.vmap over init / update / swap: an error pointing to the stacked EMA."""
    from torch.func import vmap

    stacked = {"w": torch.randn(4, 3)}
    state = fe.init({"w": torch.zeros(3)})
    calls = [
        lambda: vmap(fe.init)(stacked),
        lambda: vmap(lambda p: fe.init(p).ema)(stacked),
        lambda: vmap(fe.update)(state, stacked),
        lambda: vmap(fe.update, in_dims=(None, 0))(state, stacked),
        lambda: vmap(lambda p: fe.update(state, p).ema)(stacked),
        lambda: vmap(lambda p: fe.swap(state, p)[1])(stacked),
    ]
    for call in calls:
        judge("torch.func.vmap of init / update / swap", call, says=("stack_module_state",))


def main() -> None:
    warnings.simplefilter("ignore")  # prototype / deprecation warnings of sparse, nested, quantized tensors
    for attack in (
        attack_unsupported_leaves,
        attack_options,
        attack_failed_updates,
        attack_tied,
        attack_nonfinite_skip,
        attack_mismatches,
        attack_consumed,
        attack_containers,
        attack_vmap,
    ):
        attack()
    print_table(RESULTS)


if __name__ == "__main__":
    main()
