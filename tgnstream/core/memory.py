"""Node memory and mailbox: the per-node recurrent state of a TGN-family model."""

from __future__ import annotations

import torch

from tgnstream.core.buffers import ResizableBufferModule, grown

__all__ = ["NodeMemory"]


class NodeMemory(ResizableBufferModule):
    """Per-node memory plus one pending (aggregated) raw message per node, TGL style.

    A node's pending message is built when one of its events is applied and is folded into the
    memory only when the node's *next* events are processed (TGN "memory update at batch start"):
    this is what lets the updater receive gradient from the loss without label leakage.

    Buffers (N = capacity):
        memory: ``[N, d_mem]`` memory after the last folded message (``dtype``: float32, or a
            16-bit storage type; read as float32).
        last_update: ``[N]`` float64 time of the last folded message (0 = never).
        mail: ``[N, 2*d_mem + d_edge]`` pending raw message ``[s_self, s_other, e]`` (``dtype``).
        mail_ts: ``[N]`` float64 time of the pending message.
        has_mail: ``[N]`` bool whether a message is pending.
        is_destination: ``[N]`` bool whether the node has been the destination of an event
            (the default candidate set of a top-k query).
    """

    def __init__(
        self,
        capacity: int,
        memory_dim: int,
        edge_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.memory_dim = memory_dim
        self.mail_dim = 2 * memory_dim + edge_dim
        self.register_buffer("memory", torch.zeros(capacity, memory_dim, device=device, dtype=dtype))
        self.register_buffer("last_update", torch.zeros(capacity, dtype=torch.float64, device=device))
        self.register_buffer("mail", torch.zeros(capacity, self.mail_dim, device=device, dtype=dtype))
        self.register_buffer("mail_ts", torch.zeros(capacity, dtype=torch.float64, device=device))
        self.register_buffer("has_mail", torch.zeros(capacity, dtype=torch.bool, device=device))
        self.register_buffer("is_destination", torch.zeros(capacity, dtype=torch.bool, device=device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state saved with another storage type (a float32 checkpoint served with bfloat16
        # storage) is converted: rounded to this module's type.
        for name in ("memory", "mail"):
            saved = state_dict.get(prefix + name)
            own = getattr(self, name)
            if saved is not None and saved.dtype != own.dtype and saved.is_floating_point():
                state_dict[prefix + name] = saved.to(own.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def capacity(self) -> int:
        return int(self.memory.shape[0])

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        for name in ("memory", "last_update", "mail", "mail_ts", "has_mail", "is_destination"):
            setattr(self, name, grown(getattr(self, name), capacity))

    def reset(self) -> None:
        self.memory.zero_()
        self.last_update.zero_()
        self.mail.zero_()
        self.mail_ts.zero_()
        self.has_mail.zero_()
        self.is_destination.zero_()
