"""The learnable part of a TGN-family model, assembled from ``ModelConfig``."""

from __future__ import annotations

import math

import torch
from torch import nn

from tgnstream.core.config import ModelConfig
from tgnstream.core.modules import (
    IdentityMessage,
    LinkDecoder,
    MLPMessage,
    TemporalAttentionEmbedding,
    TimeEncoder,
    TimeProjectionEmbedding,
    pair_feature_dim,
)

__all__ = ["TGNModel"]


class TGNModel(nn.Module):
    """Parameters only (no node state): time encoder, message function, memory updater,
    embedding and link decoder. Node state lives in ``MemoryEngine``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        mail_dim = 2 * cfg.memory_dim + cfg.edge_dim
        self.time_encoder = TimeEncoder(cfg.time_dim, learnable=cfg.time_encoding == "learned")
        if cfg.message == "identity":
            self.message = IdentityMessage(mail_dim, cfg.time_dim)
        else:
            self.message = MLPMessage(mail_dim, cfg.time_dim, cfg.message_dim)
        cell = nn.GRUCell if cfg.updater == "gru" else nn.RNNCell
        self.updater = cell(self.message.out_dim, cfg.memory_dim)
        if cfg.embedding == "attention":
            self.embedding = TemporalAttentionEmbedding(cfg, self.time_encoder)
            emb_dim = cfg.embedding_dim
        elif cfg.embedding == "time":
            self.embedding = TimeProjectionEmbedding(cfg.memory_dim)
            emb_dim = cfg.memory_dim
        else:
            self.embedding = None
            emb_dim = cfg.memory_dim
        pair_dim = pair_feature_dim(cfg.activity_features) if cfg.pair_features else 0
        self.decoder = LinkDecoder(emb_dim, cfg.decoder_hidden, pair_dim)
        if cfg.pres and cfg.pres_learn_gamma:
            g = min(max(cfg.pres_gamma, 1e-4), 1 - 1e-4)
            self.pres_gamma_logit = nn.Parameter(torch.tensor(math.log(g / (1 - g))))
        elif cfg.pres:
            self.register_buffer("pres_gamma_value", torch.tensor(float(cfg.pres_gamma)))

    def pres_gamma(self) -> torch.Tensor:
        """PRES fusion weight (a scalar tensor; differentiable when learnt)."""
        if hasattr(self, "pres_gamma_logit"):
            return torch.sigmoid(self.pres_gamma_logit)
        return self.pres_gamma_value

    def update_memory(self, mail: torch.Tensor, dt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Fold pending messages into memory: ``mail [M, d_mail], dt [M], memory [M, d] -> [M, d]``."""
        msg = self.message(mail, self.time_encoder(dt))
        return self.updater(msg, memory)
