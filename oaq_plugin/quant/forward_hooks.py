"""Forward hooks on a set of modules for the length of a block: registered on entry, removed on exit."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Iterator, Tuple

from torch import nn


@contextlib.contextmanager
def forward_hooks(modules: Iterable[Tuple[str, nn.Module]], hook: Callable[..., Any], pre: bool = False,
                  with_kwargs: bool = False) -> Iterator[None]:
    """Within the block, ``hook(name, module, args[, kwargs][, output])`` runs at every call of each module.

    Args:
        modules: ``(name, module)`` pairs; the name is passed to the hook first, so one hook serves all.
        hook: As a forward hook of PyTorch with the name in front; a non-``None`` return replaces the
            module's output (or, for a pre-hook, its arguments), as in PyTorch.
        pre: Run before the module's forward (a forward pre-hook) instead of after it.
        with_kwargs: Pass the keyword arguments too (see ``nn.Module.register_forward_hook``).

    The hooks are removed when the block ends, however it ends (an exception raised by a hook to stop
    the forward pass early included).
    """
    handles = []
    try:
        for name, module in modules:
            bound = functools.partial(hook, name)
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(bound, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()
