"""What every model shares: continuous values are `nn.Parameter`s that start
frozen (requires_grad False), so a render builds no graph until a user marks
what to refine; directions and other fixed data are buffers."""

from __future__ import annotations

import torch
from torch import nn


def as_parameter(value, dtype=None, device=None) -> nn.Parameter:
    t = value.detach().clone() if torch.is_tensor(value) else torch.as_tensor(value, dtype=torch.float64)
    if dtype is not None or device is not None:
        t = t.to(device=device, dtype=dtype or t.dtype)
    return nn.Parameter(t, requires_grad=False)


def as_buffer(value, dtype=None, device=None) -> torch.Tensor:
    t = value.detach().clone() if torch.is_tensor(value) else torch.as_tensor(value, dtype=torch.float64)
    return t.to(device=device, dtype=dtype or t.dtype)


class Model(nn.Module):
    """A model whose floating-point tensors all share one dtype and device."""

    def __init__(self, dtype=torch.float32, device="cpu"):
        super().__init__()
        self._factory = dict(dtype=dtype, device=torch.device(device))

    def _param(self, name, value):
        self.register_parameter(name, as_parameter(value, **self._factory))

    def _buffer(self, name, value, dtype=None):
        self.register_buffer(name, as_buffer(value, dtype=dtype or self._factory["dtype"],
                                             device=self._factory["device"]))

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            return t.dtype
        for t in self.buffers():
            if t.is_floating_point():
                return t.dtype
        return self._factory["dtype"]

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return self._factory["device"]
