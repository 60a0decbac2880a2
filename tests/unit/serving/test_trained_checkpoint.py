"""A checkpoint from `tgnstream train` is one you can serve and continue training from: its id map
names the nodes as they were trained, and it holds the optimizer state, step count and PRES
statistics."""

from __future__ import annotations

import pytest
import torch

from tgnstream.apps.serve import initial_engine
from tgnstream.apps.serve_config import ModelSource
from tgnstream.core.checkpoint import load_checkpoint, restore_optimizer
from tgnstream.core.config import ModelConfig
from tgnstream.core.loaders import load_dataset
from tgnstream.core.negatives import NegativeSampler
from tgnstream.model_server.convert import ScoreQuery
from tgnstream.model_server.queries import score
from tgnstream.runtime.live import LiveEngine
from tgnstream.trainer.config import OfflineTrainConfig
from tgnstream.trainer.offline import make_optimizer, train_epoch, train_offline, write_outputs


@pytest.fixture(scope="module")
def trained(wikipedia_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    data = load_dataset(wikipedia_csv, limit=3000)
    cfg = OfflineTrainConfig(
        data=wikipedia_csv, out=out, limit=3000, epochs=2, batch_size=200, progress=False, pres=True
    )
    model_cfg = ModelConfig.preset("tgn", width=32, pres=True)
    result = train_offline(data, cfg, model_cfg, torch.device("cpu"))
    write_outputs(result, out)
    return data, result, out / "checkpoint.pt"


def test_names_resolve_to_the_nodes_they_were_trained_as(trained):
    data, result, path = trained
    engine, version = initial_engine(
        ModelSource(checkpoint=path, keep_checkpoint_state=True), torch.device("cpu")
    )
    engine.eval()
    engine.fold_pending()  # as the server does on start
    live = LiveEngine(engine, version, {})
    idx, unknown = live.resolve(data.raw_ids)
    assert torch.equal(idx, torch.arange(data.num_nodes)) and not bool(unknown.any())
    # A user and a page of the stream, asked for by name, score as the trained engine scores
    # the same dense nodes.
    ev = data.events
    pairs = [(int(ev.src[k]), int(ev.dst[k])) for k in (5, 700, 2999)]
    reply = score(
        live, ScoreQuery([data.raw_ids[s] for s, _ in pairs], [data.raw_ids[d] for _, d in pairs], None)
    )
    trained_engine = result.engine.eval()
    t = torch.full((3,), float(trained_engine.watermark), dtype=torch.float64)
    want = trained_engine.score(torch.tensor([s for s, _ in pairs]), torch.tensor([d for _, d in pairs]), t)
    assert torch.allclose(reply.probabilities, want.float(), atol=1e-6)
    assert not bool(reply.src_unknown.any()) and not bool(reply.dst_unknown.any())


def test_checkpoint_holds_pres_statistics_optimizer_and_steps(trained):
    data, result, path = trained
    engine, meta = load_checkpoint(path)
    assert meta["optimizer_steps"] == result.results["optimizer_steps"] > 0
    assert int(engine.pres.count.sum()) > 0
    assert torch.equal(engine.pres.mean, result.engine.pres.mean)
    opt = make_optimizer(engine.model.parameters(), 1e-4)
    assert restore_optimizer(path, opt)
    # Adam counts per parameter; those without a gradient in a batch (attention before any node
    # has neighbours) lag, so the most advanced one has taken every step.
    steps = [int(s["step"]) for s in opt.state_dict()["state"].values()]
    assert steps and max(steps) == meta["optimizer_steps"]


def test_training_continues_from_the_checkpoint_exactly(trained):
    """One more epoch from the loaded checkpoint equals one more epoch in the trainer's process."""
    data, result, path = trained

    def one_more_epoch(engine, opt_state):
        opt = make_optimizer(engine.model.parameters(), 1e-4)
        opt.load_state_dict(opt_state)
        torch.manual_seed(7)
        train_epoch(engine, data, 2000, opt, NegativeSampler(data.dst_nodes, seed=3), 200)
        return engine.state_dict()

    loaded, _ = load_checkpoint(path)
    opt = make_optimizer(loaded.model.parameters(), 1e-4)
    restore_optimizer(path, opt)
    a = one_more_epoch(loaded, opt.state_dict())
    b = one_more_epoch(result.engine, result.optimizer_state)
    for key, value in b.items():
        assert torch.equal(a[key], value), key
