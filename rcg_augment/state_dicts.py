"""Does a state dict fit a model? The one comparison of expected and found keys, shapes and kinds.

:meth:`RCGPipeline.from_pretrained <rcg_augment.pipeline.RCGPipeline.from_pretrained>` compares a
weights file's header with the modules its config builds (on the meta device, before any memory
is spent), and :mod:`rcg_augment.official` compares each converted official part with the module
it loads into; each words its own error from the :class:`StateMismatch` found here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# What is known of one entry: a tensor, or a shape alone (a safetensors header, say).
TensorLike = torch.Tensor | tuple[int, ...]


def _shape(value: TensorLike) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _floating(value: TensorLike) -> bool | None:
    return value.is_floating_point() if isinstance(value, torch.Tensor) else None


@dataclass(frozen=True)
class StateMismatch:
    """Keys (sorted) that keep ``found`` from loading where ``expected`` is wanted.

    ``wrong_kind`` lists keys of the right shape whose tensor is floating point on one side and
    integer on the other (only where both sides are tensors).
    """

    expected: Mapping[str, TensorLike]
    found: Mapping[str, TensorLike]
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]
    wrong_kind: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape or self.wrong_kind)

    def shapes(self, key: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(expected, found) shape of ``key``."""
        return _shape(self.expected[key]), _shape(self.found[key])


def compare_state(expected: Mapping[str, TensorLike], found: Mapping[str, TensorLike]) -> StateMismatch:
    """Compare ``found`` with ``expected`` (tensors or shapes per key); falsy when it fits."""
    common = set(expected) & set(found)
    wrong_shape = sorted(k for k in common if _shape(expected[k]) != _shape(found[k]))
    wrong_kind = sorted(k for k in common if k not in wrong_shape
                        and None not in (_floating(expected[k]), _floating(found[k]))
                        and _floating(expected[k]) != _floating(found[k]))
    return StateMismatch(expected, found, sorted(set(expected) - set(found)), sorted(set(found) - set(expected)),
                         wrong_shape, wrong_kind)


__all__ = ["StateMismatch", "TensorLike", "compare_state"]
