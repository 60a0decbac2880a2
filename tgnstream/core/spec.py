"""The model spec: one frozen description of a TGN-family model, its named presets, and the one
place an engine is built from it.

- :class:`ModelSpec`: the architecture (updater, embedding, message, aggregator), widths, time
  encoding, pair and activity features, PRES. ``tgnstream.core.config.ModelConfig`` is the same
  class under the name the engine uses.
- :data:`PRESETS`: ``recommended`` (the best measured recipe: TGN with pair and activity
  features, what ``make train`` trains), ``tgn`` (memory-only TGN: GRU + temporal graph
  attention), ``jodie`` (RNN + time projection).
- :func:`resolve_spec`: a preset with overrides (how every config and the CLI name a model).
- :func:`spec_settings`: the fields a config embeds (``preset`` + one optional override per spec
  field), generated from :class:`ModelSpec` so that no config declares them by hand.
- :func:`build_engine`: ``MemoryEngine`` from a spec.

Training-only settings (learning rate, epochs, negatives, the sampling correction) are not part
of the spec: they change how weights are fitted, not the function a checkpoint computes, and
live in the training configs (``OfflineTrainConfig``, ``FineTuneConfig``), whose defaults are the
recommended recipe's.
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch

    from tgnstream.core.engine import MemoryEngine

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_PRESET",
    "ModelSpec",
    "PRESETS",
    "PresetName",
    "build_engine",
    "preset_of",
    "resolve_spec",
    "spec_settings",
]


class ModelSpec(BaseModel):
    """Everything that defines a TGN-family model: architecture, widths, time encoding, pair and
    activity features. Named points: :data:`PRESETS` (``ModelSpec.preset(name)``); the engine
    is built from it (:func:`build_engine`) and a checkpoint records it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_dim: int = Field(100, ge=1, description="node memory width d_mem")
    time_dim: int = Field(100, ge=1, description="time-encoding width")
    embedding_dim: int = Field(100, ge=1, description="node embedding width (attention output)")
    edge_dim: int = Field(0, ge=0, description="edge feature width (0 = featureless)")
    message: Literal["identity", "mlp"] = Field("identity", description="message function")
    message_dim: int = Field(100, ge=1, description="output width of the MLP message function")
    aggregator: Literal["last", "mean"] = Field("last", description="combines a node's messages")
    updater: Literal["gru", "rnn"] = Field("gru", description="memory updater cell")
    embedding: Literal["attention", "time", "identity"] = Field(
        "attention", description="attention = TGN-attn, time = JODIE projection, identity = memory"
    )
    time_encoding: Literal["learned", "fixed"] = Field(
        "fixed",
        description="phi(dt) = cos(w dt + b) with w, b trained (TGN) or fixed at their log-spaced "
        "initial values (GraphMixer), which skips their backward pass",
    )
    num_neighbors: int = Field(10, ge=1, description="K most recent neighbours kept per node")
    num_heads: int = Field(2, ge=1, description="attention heads")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pair_features: bool = Field(
        False, description="decoder also sees past u-v count, time since last u-v event, common neighbours"
    )
    activity_features: bool = Field(
        False,
        description="with pair_features: the decoder also sees each endpoint's own recency (time since "
        "its latest interaction with anyone) and popularity (its number of interactions), also for "
        "pairs that never met: what ranks a source's many unseen candidates",
    )
    neighbor_memory_grad: bool = Field(
        True,
        description="backpropagate through the memory folds of neighbour-only nodes (TGN does); "
        "False computes the same values without autograd for them, which is cheaper",
    )
    fold_once: bool = Field(
        True,
        description="persist every pending message folded while scoring a batch, neighbour-only "
        "nodes' included, so each message goes through the updater once (with gradient then); "
        "False refolds a neighbour's message, with gradient, in every batch until its next "
        "event (original TGN). Scores are the same either way; only training differs: on "
        "wikipedia fold_once trained 18% faster; plain TGN lost 0.02 test AP, TGN+pair none",
    )
    decoder_hidden: int = Field(100, ge=1, description="hidden width of the link decoder MLP")
    batch_neighbors: bool = Field(
        False,
        description="temporal attention of a query at batch position k also sees the batch's events "
        "0..k-1 as neighbours (the K most recent of table and batch), as pair statistics do: "
        "large batches then lose no neighbourhood; no leakage (never its own or later events)",
    )
    pres: bool = Field(
        False,
        description="PRES prediction-correction: every memory update is fused with a prediction "
        "from the node's running transition statistics, gamma * (s_prev + mean) + (1 - gamma) * "
        "s_new, in training and serving alike (the statistics are learnt from training batches)",
    )
    pres_gamma: float = Field(0.9, ge=0.0, le=1.0, description="PRES fusion weight of the prediction")
    pres_learn_gamma: bool = Field(
        False, description="learn gamma (as sigmoid of a parameter initialised at pres_gamma)"
    )
    state_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="storage type of node memories and pending messages (the largest per-node buffers); "
        "computation stays float32, values are rounded when stored. bfloat16 halves their bytes "
        "(benchmarks/state_precision.py measures what it costs in AP/MRR)",
    )
    history_max_age: float | None = Field(
        None,
        gt=0,
        description="pair-history retention by age, in event-time units: a pair whose newest event is "
        "this much older than the newest event applied is forgotten (reads as never seen) at the "
        "next sweep, at most an eighth of it later; None keeps every pair (docs/scale-out.md, "
        "retention)",
    )
    history_max_pairs: int | None = Field(
        None,
        ge=1,
        description="pair-history retention by count: once the pairs held pass this by an eighth, the "
        "oldest (by newest event, ties by smaller ids) are forgotten down to it; None: no limit",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.embedding == "attention" and self.embedding_dim % self.num_heads:
            raise ValueError(
                f"embedding_dim {self.embedding_dim} must be divisible by num_heads {self.num_heads}"
            )
        return self

    @property
    def label(self) -> str:
        """``tgn`` / ``jodie`` for the presets' architectures, else ``<updater>+<embedding>``;
        ``+pair`` when the decoder uses pair features (model info, metrics)."""
        name = {("gru", "attention"): "tgn", ("rnn", "time"): "jodie"}.get(
            (self.updater, self.embedding), f"{self.updater}+{self.embedding}"
        )
        return name + ("+pair" if self.pair_features else "")

    @staticmethod
    def preset(name: str, width: int | None = None, **overrides) -> ModelSpec:
        """The preset ``name`` (:data:`PRESETS`) with ``overrides``.

        ``width`` sets memory, time-encoding and embedding dimensions together (as in TGN).
        """
        if width is not None:
            overrides = {"memory_dim": width, "time_dim": width, "embedding_dim": width, **overrides}
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return ModelSpec(**{**PRESETS[name], **overrides})


#: Architectures by name: the updater and embedding of TGN and JODIE (``--model``).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tgn": dict(updater="gru", embedding="attention"),
    "jodie": dict(updater="rnn", embedding="time"),
}

#: Named specs, as overrides of :class:`ModelSpec`'s field defaults (``time_encoding`` fixed and
#: ``fold_once`` on everywhere: measured no worse and faster, see the fields).
PRESETS: dict[str, dict[str, Any]] = {
    # The best measured recipe (benchmarks/README.md, quality: "tgnstream default (make train)"): TGN
    # whose decoder also sees pair statistics and each endpoint's recency and popularity; memories
    # and messages stored in bfloat16 (half their bytes; no AP/MRR cost measured:
    # benchmarks/state_precision.py).
    "recommended": dict(
        **ARCHITECTURES["tgn"], pair_features=True, activity_features=True, state_dtype="bfloat16"
    ),
    # Memory-only TGN (Rossi et al. 2020): GRU memory, temporal graph attention, MLP decoder.
    "tgn": dict(ARCHITECTURES["tgn"]),
    # JODIE (Kumar et al. 2019): RNN memory, time projection embedding.
    "jodie": dict(ARCHITECTURES["jodie"]),
}

PresetName = Literal["recommended", "tgn", "jodie"]
DEFAULT_PRESET: PresetName = "recommended"
assert set(typing.get_args(PresetName)) == set(PRESETS)


def resolve_spec(
    preset: str = DEFAULT_PRESET, architecture: str | None = None, **overrides: Any
) -> ModelSpec:
    """The spec of ``preset`` with ``architecture`` (``tgn``/``jodie``: its updater and embedding)
    and ``overrides`` (``None`` values: the preset's). As the configs and the CLI read a model:

    - ``memory_dim`` also sets ``time_dim`` and ``embedding_dim`` unless they are given (TGN's
      one width; ``--memory-dim`` has always meant that);
    - without ``pair_features`` there are no ``activity_features`` (they extend the pair
      statistics; the engine ignores them alone), so ``recommended`` with ``pair_features`` off
      is ``tgn``.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
        given = {**ARCHITECTURES[architecture], **given}
    if "memory_dim" in given:
        given.setdefault("time_dim", given["memory_dim"])
        given.setdefault("embedding_dim", given["memory_dim"])
    spec = ModelSpec.preset(preset, **given)
    if spec.activity_features and not spec.pair_features:
        spec = spec.model_copy(update={"activity_features": False})
    return spec


def preset_of(spec: ModelSpec) -> str | None:
    """The name of the preset ``spec`` is (its ``edge_dim`` aside: the data's), else None."""
    for name in PRESETS:
        if ModelSpec.preset(name, edge_dim=spec.edge_dim) == spec:
            return name
    return None


#: What an override does besides setting its field (resolve_spec's rules).
_OVERRIDE_NOTES = {
    "memory_dim": "; also time_dim and embedding_dim unless they are set",
    "activity_features": "; off without pair_features",
}


def spec_settings(
    base: type[BaseModel], default_preset: PresetName = DEFAULT_PRESET, exclude: tuple[str, ...] = ()
) -> type[BaseModel]:
    """A subclass of ``base`` with the fields a config embeds a model by: ``preset`` and, for
    every :class:`ModelSpec` field but ``exclude``, an optional override (``None``: the
    preset's), with the field's description and constraints. ``model_spec(**fixed)`` resolves
    them (:func:`resolve_spec`; ``fixed`` for what the config does not choose, such as the
    data's ``edge_dim``; an attribute ``model`` is the architecture); parsing the config fails
    when the resolved spec is invalid. Generated, so a field added to the spec is a setting of
    every config and a flag of ``tgnstream train`` without being declared again."""
    annotations: dict[str, Any] = {"preset": PresetName}
    namespace: dict[str, Any] = {
        "preset": Field(
            default_preset,
            description=f"named model spec: {', '.join(PRESETS)} (tgnstream.core.spec.PRESETS); "
            "the settings below override its fields",
        )
    }
    for name, info in ModelSpec.model_fields.items():
        if name in exclude:
            continue
        inner = typing.Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        annotations[name] = Optional[inner]  # noqa: UP045 (a runtime type, not an annotation)
        default = PRESETS[default_preset].get(name, info.default)
        namespace[name] = Field(
            None,
            description=f"{info.description or name}{_OVERRIDE_NOTES.get(name, '')} (unset: the "
            f"preset's; {default_preset}: {default!r})",
        )

    def model_spec(self, **fixed: Any) -> ModelSpec:
        overrides = {k: getattr(self, k) for k in annotations if k != "preset"}
        return resolve_spec(self.preset, getattr(self, "model", None), **{**overrides, **fixed})

    def _check_spec(self):
        self.model_spec()  # an invalid combination fails when the config is parsed
        return self

    namespace.update(
        __annotations__=annotations,
        __module__=base.__module__,
        __doc__=f"{base.__name__} with a model spec: preset + overrides.",
        model_spec=model_spec,
        _check_spec=model_validator(mode="after")(_check_spec),
    )
    return type(f"{base.__name__}WithSpec", (base,), namespace)


def build_engine(spec: ModelSpec, device: torch.device | str = "cpu", capacity: int = 1024) -> MemoryEngine:
    """The engine of ``spec`` (fresh weights from torch's generator, empty state of ``capacity``
    nodes; it grows by doubling): the one place a model is built from its spec."""
    from tgnstream.core.engine import MemoryEngine

    return MemoryEngine(spec, capacity, device)
