"""funcema: a functional, JAX-style exponential moving average of model weights for PyTorch.

The EMA state is an immutable pytree; [`init`][funcema.init], [`update`][funcema.update] and
[`swap`][funcema.swap] are pure functions, vectorised with multi-tensor kernels and traceable by
`torch.compile(fullgraph=True)`.

This file only re-exports the public API (`funcema.posthoc`, `funcema.schedules` and
`funcema.nn` are public modules); docs/architecture.md shows the layers below it.

Examples:
    >>> import torch, funcema as fe
    >>> model = torch.nn.Linear(4, 2)
    >>> state = fe.init(dict(model.named_parameters()), schedule=fe.schedules.warmup())
    >>> state = fe.update(state, dict(model.named_parameters()))
    >>> int(state.step)
    1
"""

from . import nn as nn
from . import posthoc as posthoc
from . import schedules as schedules
from ._core import init as init
from ._core import swap as swap
from ._core import update as update
from ._io import load as load
from ._io import save as save
from ._sigma import gamma_to_sigma_rel as gamma_to_sigma_rel
from ._sigma import sigma_rel_to_gamma as sigma_rel_to_gamma
from ._state import EmaConfig as EmaConfig
from ._state import EmaState as EmaState
from ._stateful import EMA as EMA
from .nn import copy_to as copy_to
from .nn import swapped as swapped

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "EmaConfig",
    "EmaState",
    "copy_to",
    "gamma_to_sigma_rel",
    "init",
    "load",
    "nn",
    "posthoc",
    "save",
    "schedules",
    "sigma_rel_to_gamma",
    "swap",
    "swapped",
    "update",
]
