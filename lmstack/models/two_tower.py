"""Two-tower (dual encoder) model for contrastive training and retrieval.

Two towers map queries (``a``) and documents (``b``) to vectors: each is an
:class:`~lmstack.models.encoder.Encoder` (one shared by both towers, or one each), pooled
(mean / cls / last) and projected by the tower's own ``d_model -> projection_dim`` head.
The embeddings are returned unnormalised: the contrastive loss normalises them. The
model also holds the loss's learned scalars, ``logit_scale`` (log of the similarity scale,
CLIP's temperature) and ``logit_bias`` (SigLIP's bias; unused by InfoNCE), so they train,
shard and checkpoint with the towers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack.models.encoder import ENCODER_CHOICES, ENCODER_DEFAULTS, Encoder, EncoderConfig
from lmstack.models.projection import Projection
from lmstack.registry import register

Array = jax.Array

TOWERS = ("a", "b")


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    encoder: EncoderConfig
    share_towers: bool = True
    projection_dim: int = 0  # 0: encoder.d_model
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP
    logit_bias_init: float = -10.0  # SigLIP

    def __post_init__(self):
        if self.encoder.mlm_head:  # the towers never predict tokens: no unused parameters
            object.__setattr__(self, "encoder", dataclasses.replace(self.encoder, mlm_head=False))
        if not self.projection_dim:
            object.__setattr__(self, "projection_dim", self.encoder.d_model)

    @classmethod
    def from_config(cls, m: Any, *, vocab_size: int, max_seq_len: int) -> "TwoTowerConfig":
        """The towers' encoder from ``config.model`` as for ``model.encoder``, plus
        ``share_towers`` and ``projection_dim`` (0: ``d_model``)."""
        enc = EncoderConfig.from_config(m, vocab_size=vocab_size, max_seq_len=max_seq_len)
        return cls(encoder=enc, share_towers=m.share_towers, projection_dim=m.projection_dim,
                   logit_scale_init=m.logit_scale_init, logit_bias_init=m.logit_bias_init)

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.encoder.max_seq_len

    @property
    def dtype(self) -> str:
        return self.encoder.dtype

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of either tower: the encoder's convention (no MLM head);
        the pooling and projection run once per sequence and are left out."""
        return self.encoder.flops_per_token(seq_len)


@register("model.two_tower")
class TwoTower(nnx.Module):
    """``TwoTower(cfg, rngs=...)(a_tokens, b_tokens)`` -> ``(emb_a, emb_b)``, float32
    ``(b, projection_dim)`` each."""

    config_class = TwoTowerConfig
    config_defaults = dict(
        ENCODER_DEFAULTS,
        share_towers=True,  # one encoder for both towers (each has its own projection)
        projection_dim=0,  # output width of each tower's projection; 0: d_model
        logit_scale_init=math.log(1 / 0.07),  # log similarity scale for the InfoNCE loss (CLIP)
        logit_bias_init=-10.0,  # similarity bias for the sigmoid loss (SigLIP)
    )
    config_choices = ENCODER_CHOICES

    def __init__(self, cfg: TwoTowerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        enc = cfg.encoder
        if cfg.share_towers:
            self.encoder = Encoder(enc, rngs=rngs)
        else:
            self.encoder_a = Encoder(enc, rngs=rngs)
            self.encoder_b = Encoder(enc, rngs=rngs)
        d, p = enc.d_model, cfg.projection_dim
        proj = dict(std=enc.init_std, bias=enc.use_bias, rngs=rngs, dtype=enc.dtype)
        self.projection_a = Projection((d,), (p,), ("embed", "projection"), **proj)
        self.projection_b = Projection((d,), (p,), ("embed", "projection"), **proj)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32), out_sharding=())
        self.logit_bias = nnx.Param(jnp.asarray(cfg.logit_bias_init, jnp.float32), out_sharding=())

    def tower(self, tower: str) -> Encoder:
        """The encoder of tower ``'a'`` or ``'b'`` (the same one when shared)."""
        if tower not in TOWERS:
            raise ValueError(f"tower {tower!r} is not one of {', '.join(TOWERS)}")
        if self.cfg.share_towers:
            return self.encoder
        return self.encoder_a if tower == "a" else self.encoder_b

    def pooled(self, tokens_bt: Array, segment_ids_bt: Array | None = None, *, tower: str = "a",
               rng: Array | None = None) -> Array:
        """The tower's pooled encoder output (b, d), float32, before its projection."""
        encoder = self.tower(tower)
        hidden = encoder(tokens_bt, segment_ids=segment_ids_bt, rng=rng)
        return encoder.pooled(hidden, segment_ids_bt)

    def features(self, tokens_bt: Array, segment_ids_bt: Array) -> Array:
        """Tower a's pooled output before its projection, for probes."""
        return self.pooled(tokens_bt, segment_ids_bt, tower="a")

    def embed(self, tokens_bt: Array, segment_ids_bt: Array | None = None, tower: str = "a", *,
              rng: Array | None = None) -> Array:
        """Embeddings (b, projection_dim), float32, unnormalised: one sequence per row,
        padding = segment 0. For retrieval: queries with ``tower='a'``, documents with 'b'."""
        x = self.pooled(tokens_bt, segment_ids_bt, tower=tower, rng=rng)
        return (self.projection_a if tower == "a" else self.projection_b)(x, out_dtype=jnp.float32)

    def __call__(self, a_tokens: Array, b_tokens: Array, *, a_segment_ids: Array | None = None,
                 b_segment_ids: Array | None = None, rng: Array | None = None) -> tuple[Array, Array]:
        """Projected embeddings of both towers, ``(emb_a, emb_b)``."""
        r_a, r_b = (None, None) if rng is None else (jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1))
        return (self.embed(a_tokens, a_segment_ids, "a", rng=r_a),
                self.embed(b_tokens, b_segment_ids, "b", rng=r_b))
