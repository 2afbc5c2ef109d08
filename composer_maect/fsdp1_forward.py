"""Run a wrapped module's own methods through its FSDP1 wrapper.

FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) gathers a unit's sharded parameters only inside the
wrapper's ``forward``. Composer 0.32.1 wraps each child of the ``ComposerModel`` (the ViT ``encoder``, the NNCLR head).
Code that keeps a reference to the unwrapped module and calls ``vit.forward_features(x)`` or ``head(x)`` directly
therefore meets sharded parameters, and the patch embedding fails with "weight should have at least three
dimensions". FSDP2 has ``register_fsdp_forward_method`` for this. FSDP1 has nothing similar, so the functions here
route such calls through the wrapper, with the method standing in for the module's ``forward`` during the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

__all__ = ['find_fsdp1_wrapper', 'fsdp1_forward_features', 'route_forward_features']


def find_fsdp1_wrapper(root: nn.Module, module: nn.Module) -> nn.Module | None:
    """Return the FSDP1 ``FullyShardedDataParallel`` inside ``root`` whose wrapped module is ``module``, or None."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for candidate in root.modules():
        if isinstance(candidate, FullyShardedDataParallel) and candidate.module is module:
            return candidate
    return None


def _call_as_forward(wrapper: nn.Module, module: nn.Module, method: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        # The wrapper calls module(...), which looks up the instance attribute before the class's forward.
        module.forward = method
        try:
            return wrapper(*args, **kwargs)
        finally:
            del module.forward

    return call


def route_forward_features(root: nn.Module, vit: nn.Module) -> bool:
    """Make ``vit.forward_features`` run through the FSDP1 wrapper of ``vit`` in ``root``, if there is one.

    Sets an instance attribute that stays for the life of ``vit``; the class's method is called inside the wrapper.

    Returns:
        Whether ``vit`` has an FSDP1 wrapper, so that the call was rerouted.
    """
    wrapper = find_fsdp1_wrapper(root, vit)
    if wrapper is None:
        return False
    vit.forward_features = _call_as_forward(wrapper, vit, type(vit).forward_features.__get__(vit))
    return True


@contextlib.contextmanager
def fsdp1_forward_features(root: nn.Module, vit: nn.Module) -> Iterator[None]:
    """Route ``vit.forward_features`` through its FSDP1 wrapper in ``root`` inside the ``with`` block only."""
    had_route = 'forward_features' in vit.__dict__
    rerouted = not had_route and route_forward_features(root, vit)
    try:
        yield
    finally:
        if rerouted:
            del vit.forward_features
