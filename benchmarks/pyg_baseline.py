"""PyTorch Geometric TGN baseline: a faithful re-implementation of PyG's ``examples/tgn.py``.

This module exists so that our benchmark can run the reference TGN implementation side by side
with our engine on exactly the same data, split and metrics. The model and the training loop are
those of PyG's example (``TGNMemory`` with ``IdentityMessage`` and ``LastAggregator``, a
``GraphAttentionEmbedding`` made of one ``TransformerConv`` over the ``LastNeighborLoader``'s 10
most recent neighbours, a ``LinkPredictor`` MLP, Adam lr 1e-4, ``BCEWithLogitsLoss``, one random
negative destination per positive, memory and neighbour loader reset at each epoch start,
``memory.detach()`` after each step). Only the evaluation follows our protocol
(``tgnstream.core.evaluation``) instead of the example's per-batch sklearn means:

- chronological 70/15/15 split by event order (``TemporalDataset.chronological_split``);
- training for a fixed number of epochs, each followed by a validation pass that carries the
  memory on from training and applies the true events after each batch is scored (as PyG's
  ``test()``); no early stopping;
- after the last epoch, the validation pass continues straight into the test pass;
- test AP / ROC-AUC over all test events with one uniformly random negative destination per
  positive (drawn from the protocol's candidates, ``candidate_pool``: the destinations of a
  bipartite graph, else every node; seeded), plus MRR and hits@10 ranking every positive
  destination against all other destination nodes (ties count half);
- the same metrics restricted to inductive test events (source or destination never seen in the
  training portion).

Deviations from the example (the first three are also reported in the returned ``notes``):

- Featureless data (edge feature dim 0) crashes ``TGNMemory``: ``_compute_msg`` drops every empty
  per-node raw-message tensor except the first, so with ``raw_msg_dim == 0`` the concatenated raw
  messages have the wrong number of rows and ``IdentityMessage``'s ``torch.cat`` fails. We then
  feed a single all-zero feature column (``raw_msg_dim == 1``). A constant zero input contributes
  nothing to any output and gets zero gradient, so the function computed is that of the
  featureless model; only the (unused) extra weights and the init bounds (fan-in + 1) differ.
- Timestamps are cast to int64 because ``TGNMemory.last_update`` is an int64 buffer (PyG's JODIE
  data has integer seconds); fractional timestamps would be truncated (flagged in ``notes``).
- ``torch.use_deterministic_algorithms(True)`` is on for the duration of ``run_pyg_tgn``: with two
  or more CPU threads some kernels otherwise reduce in a run-dependent order and same-seed runs
  diverge (already after one epoch). The math is unchanged; throughput is about the same.
- AP / AUC are computed once over all events of a split (our protocol); the example averages
  sklearn's per-batch scores, reported here as ``test.ap_batch_mean`` for reference.
- Negatives are drawn with dedicated seeded ``torch.Generator``s (training: one stream for the
  whole run; evaluation: re-seeded at the start of every evaluation segment, like the example's
  ``torch.manual_seed(12345)`` in ``test()``), so evaluation does not perturb the training RNG.

torch_geometric (``pip install -e '.[bench]'``) is imported when a model is built, so ``--help``
and the scripts that import this module without running PyG work without it.

Usage::

    python benchmarks/pyg_baseline.py --data wikipedia --epochs 12 --threads 2 [--out F]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path

import torch
from _harness import dataset_path, write_results
from torch import Tensor
from torch.nn import Linear

from tgnstream.core.evaluation import average_precision, ranking_metrics, roc_auc
from tgnstream.core.events import TemporalDataset
from tgnstream.core.stream_eval import candidate_pool

__all__ = ["GraphAttentionEmbedding", "LinkPredictor", "run_pyg_tgn"]

# Offset added to the seed for the evaluation negative-sampling generator.
_EVAL_SEED_OFFSET = 12345
# Upper bound on the elements of one [P, C, dim] candidate-scoring tensor (~256 MiB in float32).
_MAX_SCORE_ELEMS = 64 * 1024 * 1024


class GraphAttentionEmbedding(torch.nn.Module):
    """PyG example's embedding: one TransformerConv whose edge attr is [time_enc(dt) ‖ msg]."""

    def __init__(self, in_channels: int, out_channels: int, msg_dim: int, time_enc):
        from torch_geometric.nn import TransformerConv

        super().__init__()
        self.time_enc = time_enc
        edge_dim = msg_dim + time_enc.out_channels
        self.conv = TransformerConv(in_channels, out_channels // 2, heads=2, dropout=0.1, edge_dim=edge_dim)

    def forward(self, x: Tensor, last_update: Tensor, edge_index: Tensor, t: Tensor, msg: Tensor):
        rel_t = last_update[edge_index[0]] - t
        rel_t_enc = self.time_enc(rel_t.to(x.dtype))
        edge_attr = torch.cat([rel_t_enc, msg], dim=-1)
        return self.conv(x, edge_index, edge_attr)


class LinkPredictor(torch.nn.Module):
    """PyG example's link predictor: lin_final(relu(lin_src(z_src) + lin_dst(z_dst)))."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.lin_src = Linear(in_channels, in_channels)
        self.lin_dst = Linear(in_channels, in_channels)
        self.lin_final = Linear(in_channels, 1)

    def forward(self, z_src: Tensor, z_dst: Tensor) -> Tensor:
        h = self.lin_src(z_src) + self.lin_dst(z_dst)
        h = h.relu()
        return self.lin_final(h)

    def score_all(self, z_src: Tensor, z_cand: Tensor) -> Tensor:
        """Logits ``[P, C]`` of every (source, candidate) pair, computed separably.

        ``lin_src``/``lin_dst`` are applied once per row and once per candidate and broadcast to
        ``[P, C, dim]`` before relu and ``lin_final``: the same function as ``forward`` on the
        expanded pairs. Candidates are processed in chunks to bound peak memory.
        """
        hs = self.lin_src(z_src).unsqueeze(1)  # [P, 1, d]
        hd = self.lin_dst(z_cand)  # [C, d]
        p, d = hs.shape[0], hs.shape[-1]
        chunk = max(1, _MAX_SCORE_ELEMS // max(1, p * d))
        out = []
        for c0 in range(0, hd.shape[0], chunk):
            h = (hs + hd[c0 : c0 + chunk].unsqueeze(0)).relu_()
            out.append(self.lin_final(h).squeeze(-1))
        return torch.cat(out, dim=1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional here
        pass


def _deterministic_algorithms(fn):
    """Run ``fn`` with PyTorch's deterministic algorithms on, restoring the previous setting."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        prev = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        # On CUDA some PyG scatter kernels have no deterministic variant: warn instead of raising.
        device = torch.device(kwargs.get("device", "cpu"))
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])

    return wrapper


@_deterministic_algorithms
def run_pyg_tgn(
    dataset: TemporalDataset,
    *,
    epochs: int = 12,
    batch_size: int = 200,
    seed: int = 0,
    device: str = "cpu",
    lr: float = 1e-4,
    dim: int = 100,
    num_neighbors: int = 10,
    progress: bool = True,
) -> dict:
    """Train and evaluate PyG's example TGN on ``dataset`` under our protocol.

    Args:
        dataset: the event stream (dense ids, time-ordered).
        epochs: fixed number of training epochs (no early stopping).
        batch_size: events per batch, for training and evaluation.
        seed: seeds model init, dropout and negative sampling.
        device: torch device to run on.
        lr: Adam learning rate.
        dim: memory, time-encoding and embedding dimension (the example's 100).
        num_neighbors: ``LastNeighborLoader`` size (the example's 10).
        progress: show tqdm progress bars on stderr.

    Returns:
        A JSON-serialisable dict: ``system``, ``torch_geometric``, ``epochs``, ``batch_size``,
        ``train_events_per_s``, ``seconds_per_epoch``, ``val_ap_per_epoch``, ``test`` (``ap``,
        ``auc``, ``mrr``, ``hits@10``, plus ``ap_batch_mean``: the example's mean of per-batch
        APs), ``test_inductive`` (same keys and ``n_events``), ``notes`` and a few extras
        (``seed``, ``threads``, ``dataset``, ``train_loss_per_epoch``, ...).

    PyTorch's deterministic algorithms are enabled for the duration of the call (and restored
    afterwards): with more than one intra-op thread some CPU kernels otherwise reduce in a
    run-dependent order and two runs with the same seed diverge.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    import torch_geometric
    from torch_geometric.nn import TGNMemory
    from torch_geometric.nn.models.tgn import IdentityMessage, LastAggregator, LastNeighborLoader
    from tqdm.auto import tqdm

    _seed_everything(seed)
    dev = torch.device(device)
    notes: list[str] = [
        "torch.use_deterministic_algorithms(True) during the run (same-seed runs reproduce; "
        "with >1 CPU thread they otherwise diverge)"
    ]

    # ---------------------------------------------------------------- data
    ev = dataset.events
    num_nodes = int(dataset.num_nodes)
    src_all = ev.src.to(dev, torch.long)
    dst_all = ev.dst.to(dev, torch.long)
    t64 = ev.t.to(torch.float64)
    if bool((t64 != t64.floor()).any()):
        notes.append(
            "timestamps are fractional but TGNMemory.last_update is int64: times truncated to whole units"
        )
    t_all = t64.floor().to(dev, torch.long)
    msg_all = ev.feats.to(dev, torch.float32)
    raw_msg_dim = msg_all.shape[1]
    if raw_msg_dim == 0:
        msg_all = torch.zeros(len(ev), 1, dtype=torch.float32, device=dev)
        raw_msg_dim = 1
        notes.append(
            "featureless data: PyG TGNMemory crashes with raw_msg_dim=0 (_compute_msg drops "
            "empty raw-message tensors, then IdentityMessage's torch.cat has mismatched rows); "
            "a single all-zero edge-feature column is used instead (raw_msg_dim=1), which adds "
            "nothing to any output and gets zero gradient"
        )
    # The candidates of the shared protocol: destinations of a bipartite graph, else every node.
    dst_nodes = candidate_pool(dataset).to(dev, torch.long)
    num_dst = int(dst_nodes.numel())
    dst_col = torch.full((num_nodes,), -1, dtype=torch.long, device=dev)
    dst_col[dst_nodes] = torch.arange(num_dst, device=dev)

    n = len(dataset)
    val_start, test_start = dataset.chronological_split()
    n_train = val_start
    seen = torch.zeros(num_nodes, dtype=torch.bool, device=dev)
    seen[src_all[:val_start]] = True
    seen[dst_all[:val_start]] = True

    # --------------------------------------------------------------- model
    memory = TGNMemory(
        num_nodes,
        raw_msg_dim,
        dim,
        dim,
        message_module=IdentityMessage(raw_msg_dim, dim, dim),
        aggregator_module=LastAggregator(),
    ).to(dev)
    gnn = GraphAttentionEmbedding(
        in_channels=dim, out_channels=dim, msg_dim=raw_msg_dim, time_enc=memory.time_enc
    ).to(dev)
    link_pred = LinkPredictor(in_channels=dim).to(dev)
    # The example uses a set union (time_enc is shared); dict.fromkeys dedups in a fixed order.
    params = list(dict.fromkeys([*memory.parameters(), *gnn.parameters(), *link_pred.parameters()]))
    optimizer = torch.optim.Adam(params, lr=lr)
    criterion = torch.nn.BCEWithLogitsLoss()
    neighbor_loader = LastNeighborLoader(num_nodes, size=num_neighbors, device=dev)
    assoc = torch.empty(num_nodes, dtype=torch.long, device=dev)
    train_gen = torch.Generator().manual_seed(seed)

    def sample_neg(size: int, gen: torch.Generator) -> Tensor:
        idx = torch.randint(0, num_dst, (size,), generator=gen)
        return dst_nodes[idx.to(dev)]

    def embed(query: Tensor) -> Tensor:
        """Embeddings of ``query`` nodes (and their neighbours); rows indexed through assoc."""
        n_id, edge_index, e_id = neighbor_loader(query)
        assoc[n_id] = torch.arange(n_id.size(0), device=dev)
        z, last_update = memory(n_id)
        return gnn(z, last_update, edge_index, t_all[e_id], msg_all[e_id])

    def apply_events(lo: int, hi: int) -> None:
        memory.update_state(src_all[lo:hi], dst_all[lo:hi], t_all[lo:hi], msg_all[lo:hi])
        neighbor_loader.insert(src_all[lo:hi], dst_all[lo:hi])

    # ------------------------------------------------------------ training
    def train_epoch(epoch: int) -> tuple[float, float]:
        memory.train()
        gnn.train()
        link_pred.train()
        memory.reset_state()  # Start with a fresh memory.
        neighbor_loader.reset_state()  # Start with an empty graph.

        total_loss = 0.0
        starts = range(0, n_train, batch_size)
        bar = tqdm(starts, desc=f"train {epoch}", leave=False, disable=not progress)
        t0 = time.perf_counter()
        for lo in bar:
            hi = min(lo + batch_size, n_train)
            src, dst = src_all[lo:hi], dst_all[lo:hi]
            neg = sample_neg(hi - lo, train_gen)
            optimizer.zero_grad()

            z = embed(torch.cat([src, dst, neg]).unique())
            pos_out = link_pred(z[assoc[src]], z[assoc[dst]])
            neg_out = link_pred(z[assoc[src]], z[assoc[neg]])
            loss = criterion(pos_out, torch.ones_like(pos_out))
            loss = loss + criterion(neg_out, torch.zeros_like(neg_out))

            # Update memory and neighbour loader with ground-truth state.
            apply_events(lo, hi)

            loss.backward()
            optimizer.step()
            memory.detach()
            total_loss += float(loss.detach()) * (hi - lo)
        seconds = time.perf_counter() - t0
        return total_loss / n_train, seconds

    # ---------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(lo_all: int, hi_all: int, desc: str, rank: bool) -> dict:
        """Score events [lo_all, hi_all) batch by batch, then apply them (PyG's ``test()``)."""
        memory.eval()
        gnn.eval()
        link_pred.eval()
        gen = torch.Generator().manual_seed(seed + _EVAL_SEED_OFFSET)
        pos_l, neg_l, ind_l, batch_aps = [], [], [], []
        rank_sums = {"mrr": 0.0, "hits@10": 0.0}
        rank_ind_sums = {"mrr": 0.0, "hits@10": 0.0}
        starts = range(lo_all, hi_all, batch_size)
        for lo in tqdm(starts, desc=desc, leave=False, disable=not progress):
            hi = min(lo + batch_size, hi_all)
            src, dst = src_all[lo:hi], dst_all[lo:hi]
            neg = sample_neg(hi - lo, gen)
            if rank:
                # Embeddings do not depend on query time: one pass over all destinations.
                z = embed(torch.cat([src, dst, neg, dst_nodes]).unique())
                scores = link_pred.score_all(z[assoc[src]], z[assoc[dst_nodes]])  # [B, D]
                rows = torch.arange(hi - lo, device=dev)
                pos_out = scores[rows, dst_col[dst]]
                neg_out = scores[rows, dst_col[neg]]
                others = scores.clone()
                others[rows, dst_col[dst]] = float("-inf")  # exclude the positive itself
                ind = ~seen[src] | ~seen[dst]
                r = ranking_metrics(pos_out, others, k=10)
                for k in rank_sums:
                    rank_sums[k] += r[k] * (hi - lo)
                n_ind = int(ind.sum())
                if n_ind:
                    r = ranking_metrics(pos_out[ind], others[ind], k=10)
                    for k in rank_ind_sums:
                        rank_ind_sums[k] += r[k] * n_ind
                ind_l.append(ind.cpu())
            else:
                z = embed(torch.cat([src, dst, neg]).unique())
                pos_out = link_pred(z[assoc[src]], z[assoc[dst]]).view(-1)
                neg_out = link_pred(z[assoc[src]], z[assoc[neg]]).view(-1)
            pos_l.append(pos_out.cpu())
            neg_l.append(neg_out.cpu())
            y = torch.cat([torch.ones(hi - lo), torch.zeros(hi - lo)])
            batch_aps.append(average_precision(torch.cat([pos_l[-1], neg_l[-1]]), y))

            apply_events(lo, hi)

        pos, neg = torch.cat(pos_l), torch.cat(neg_l)
        out = _binary_metrics(pos, neg)
        out["ap_batch_mean"] = float(sum(batch_aps) / len(batch_aps))
        if rank:
            m = pos.numel()
            out.update({k: v / m for k, v in rank_sums.items()})
            ind = torch.cat(ind_l)
            n_ind = int(ind.sum())
            inductive = {"n_events": n_ind}
            if n_ind:
                inductive.update(_binary_metrics(pos[ind], neg[ind]))
                inductive.update({k: v / n_ind for k, v in rank_ind_sums.items()})
            else:
                inductive.update({"ap": None, "auc": None, "mrr": None, "hits@10": None})
            out["inductive"] = inductive
        return out

    # ----------------------------------------------------------------- run
    val_aps, losses, train_seconds = [], [], []
    test = None
    epoch_bar = tqdm(range(1, epochs + 1), desc="pyg-tgn epochs", disable=not progress)
    for epoch in epoch_bar:
        loss, secs = train_epoch(epoch)
        losses.append(loss)
        train_seconds.append(secs)
        val = evaluate(val_start, test_start, f"val {epoch}", rank=False)
        val_aps.append(val["ap"])
        if epoch == epochs:  # memory carried on from validation into test
            test = evaluate(test_start, n, "test", rank=True)
        epoch_bar.set_postfix(loss=f"{loss:.4f}", val_ap=f"{val['ap']:.4f}", ev_s=f"{n_train / secs:.0f}")
    epoch_bar.close()

    assert test is not None
    test_inductive = test.pop("inductive")
    total_train = sum(train_seconds)
    return {
        "system": "pyg-tgn",
        "torch_geometric": torch_geometric.__version__,
        "torch": torch.__version__,
        "dataset": dataset.name,
        "featureless": dataset.edge_dim == 0,
        "num_events": n,
        "split": {"train": n_train, "val": test_start - val_start, "test": n - test_start},
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "train_events_per_s": n_train * epochs / total_train,
        "seconds_per_epoch": total_train / epochs,
        "train_seconds_per_epoch": train_seconds,
        "train_loss_per_epoch": losses,
        "val_ap_per_epoch": val_aps,
        "test": {k: test[k] for k in ("ap", "auc", "mrr", "hits@10", "ap_batch_mean")},
        "test_inductive": test_inductive,
        "ranking_candidates": num_dst,
        "notes": notes,
    }


def _binary_metrics(pos: Tensor, neg: Tensor) -> dict:
    scores = torch.cat([pos, neg])
    labels = torch.cat([torch.ones(pos.numel()), torch.zeros(neg.numel())])
    return {"ap": average_precision(scores, labels), "auc": roc_auc(scores, labels)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train and evaluate PyTorch Geometric's example TGN (baseline) on a dataset."
    )
    parser.add_argument(
        "--data", type=dataset_path, default="wikipedia", help="dataset name or path (see tgnstream loaders)"
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N events")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the result here (with its provenance)"
    )
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from tgnstream.core.loaders import load_dataset

    if args.limit is None:
        dataset = load_dataset(args.data)
    else:
        dataset = load_dataset(args.data, limit=args.limit)
    result = run_pyg_tgn(
        dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    result["data"] = str(args.data)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if args.out is not None:
        write_results(args.out, {"benchmark": "pyg_baseline", **result}, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
