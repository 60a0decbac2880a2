"""The compose-equivalent loop, run from an *installed* tgnstream (not the checkout).

Started by ``scripts/wheel_check.sh`` with the python of a virtualenv that holds the built wheel,
as a non-root user, from a working directory that user cannot write. It runs what
``deploy/docker-compose.yml`` runs, with the deploy configs and ``/data``- and ``/models``-style
directories under ``--root``:

  embedded broker -> replay of a slice of the dataset -> ``tgnstream trainer`` publishes its start
  model -> ``tgnstream serve`` serves it -> Score and TopK -> more events -> the trainer publishes a
  new version and the server swaps it in -> SIGTERM (trainer, then server: final snapshot, exit 0
  within the stop grace) -> the server restarts from its snapshot and answers exactly as before.

Exits 0 when every step passed, 1 with the failing step and the processes' logs otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import tgnstream
from tgnstream.apps.broker import free_port
from tgnstream.apps.testing import wait_until
from tgnstream.client import LinkPredictionClient


class CheckFailed(RuntimeError):
    pass


def wait_for(check, timeout: float, what: str):
    """The installed package's poll helper, its timeout reported as a failed step."""
    try:
        return wait_until(check, timeout, what, every=0.5)
    except AssertionError as e:
        raise CheckFailed(str(e)) from None


class Proc:
    """A tgnstream command of the installed package, its output in ``<root>/<name>.log``."""

    def __init__(self, root: Path, name: str, args: list[str], env: dict[str, str]):
        self.name, self.log_path = name, root / f"{name}.log"
        exe = Path(sys.executable).parent / "tgnstream"
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [str(exe), *args], env={**os.environ, **env}, stdout=self.log_file, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds to exit)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise CheckFailed(f"{self.name} did not exit within {timeout:.0f} s of SIGTERM") from None
        finally:
            self.log_file.close()
        return code, time.monotonic() - started

    def kill(self) -> None:
        """SIGTERM first (the broker stops its Tansu child on it; SIGKILL would orphan it)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of the Prometheus text exposition (None: not exported)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name):
            head, _, value = line.rpartition(" ")
            if head == name or (want and head.startswith(name + "{") and want in head):
                return float(value)
    return None


def read_ready(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def first_ids(data: Path, n: int) -> tuple[list[str], list[str]]:
    """Source and destination ids of the first ``n`` events, exactly as the replayer sends them."""
    from tgnstream.apps.replay import iter_records
    from tgnstream.core.loaders import load_dataset

    events = [json.loads(value) for _, value in iter_records(load_dataset(data, limit=n), 0, n)]
    return [str(e["src"]) for e in events], [str(e["dst"]) for e in events]


def answers(client: LinkPredictionClient, pairs: list[tuple[str, str]], source: str) -> dict:
    score = client.score(pairs)
    topk = client.top_k(source, k=10)
    probs = list(score.probabilities)
    if len(probs) != len(pairs) or not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs):
        raise CheckFailed(f"Score answered {probs[:5]}... for {len(pairs)} pairs")
    if len(topk.results) != 10:
        raise CheckFailed(f"TopK answered {len(topk.results)} results, not 10")
    return {
        "model_version": score.state.model_version,
        "events_applied": score.state.events_applied,
        "probabilities": probs,
        "topk": [(r.id, r.probability) for r in topk.results],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="writable folder for data/, models/ and logs")
    p.add_argument("--deploy", type=Path, required=True, help="the repository's deploy/ folder (read only)")
    p.add_argument("--data", type=Path, required=True, help="a JODIE .csv (wikipedia)")
    p.add_argument("--events", type=int, default=6000, help="events replayed in two halves")
    p.add_argument("--timeout-s", type=float, default=300, help="longest wait of any one step")
    args = p.parse_args()

    root = args.root.resolve()
    data_dir, models_dir = root / "data", root / "models"
    data_dir.mkdir(parents=True, exist_ok=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    installed = Path(tgnstream.__file__).resolve()
    print(f"tgnstream from {installed} (cwd {Path.cwd()}, uid {os.getuid()})", flush=True)
    if Path.cwd() in installed.parents:
        raise SystemExit("the check must run the installed package, not a checkout")

    bootstrap = f"127.0.0.1:{free_port()}"
    grpc_port, server_metrics, trainer_metrics = free_port(), free_port(), free_port()
    server_env = {
        "TGNSTREAM_SERVE_INGEST__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "TGNSTREAM_SERVE_SNAPSHOTS__DIR": str(data_dir / "snapshots"),
        "TGNSTREAM_SERVE_MODELS__DIR": str(models_dir),
        "TGNSTREAM_SERVE_MODELS__WATCH_INTERVAL_S": "1",
        "TGNSTREAM_SERVE_GRPC__HOST": "127.0.0.1",
        "TGNSTREAM_SERVE_GRPC__PORT": str(grpc_port),
        "TGNSTREAM_SERVE_GRPC__READERS": "1",
        "TGNSTREAM_SERVE_METRICS_HOST": "127.0.0.1",
        "TGNSTREAM_SERVE_METRICS_PORT": str(server_metrics),
        "TGNSTREAM_SERVE_READY_FILE": str(root / "server.ready"),
    }
    half = args.events // 2
    trainer_env = {
        "TGNSTREAM_TRAINER_STREAM__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "TGNSTREAM_TRAINER_PUBLISH__DIR": str(models_dir),
        "TGNSTREAM_TRAINER_CHECKPOINTS__DIR": str(data_dir / "trainer"),
        "TGNSTREAM_TRAINER_METRICS_HOST": "127.0.0.1",
        "TGNSTREAM_TRAINER_METRICS_PORT": str(trainer_metrics),
        "TGNSTREAM_TRAINER_READY_FILE": str(root / "trainer.ready"),
        "TGNSTREAM_TRAINER_PROGRESS": "false",
        "TGNSTREAM_TRAINER_TORCH_THREADS": "1",
        # Small rounds so that the second half of the replay makes a new version within a minute;
        # the gate is opened: this checks publication and swap, not model quality.
        "TGNSTREAM_TRAINER_TRAINING__WINDOW_EVENTS": str(half),
        "TGNSTREAM_TRAINER_TRAINING__EVERY_EVENTS": str(half // 2),
        "TGNSTREAM_TRAINER_TRAINING__MIN_NEW_EVENTS": str(half // 4),
        "TGNSTREAM_TRAINER_TRAINING__HOLDOUT_EVENTS": str(half // 10),
        "TGNSTREAM_TRAINER_GATE__MAX_AP_DROP": "1",
        "TGNSTREAM_TRAINER_GATE__MAX_MRR_DROP": "1",
    }
    procs: list[Proc] = []
    step = "start"
    try:
        step = "broker"
        broker = Proc(
            root,
            "broker",
            [
                "broker",
                "--port",
                bootstrap.split(":")[1],
                "--topic",
                "events",
                "--log-file",
                str(root / "tansu.log"),
            ],
            {},
        )
        procs.append(broker)
        wait_for(lambda: "events" in broker.log() or not broker.alive(), args.timeout_s, "the broker")
        if not broker.alive():
            raise CheckFailed("the broker exited")

        def replay(start: int, limit: int) -> None:
            cmd = [str(Path(sys.executable).parent / "tgnstream"), "replay", "--data", str(args.data)]
            cmd += [
                "--topic",
                "events",
                "--bootstrap",
                bootstrap,
                "--start",
                str(start),
                "--limit",
                str(limit),
            ]
            subprocess.run([*cmd, "--no-progress"], check=True, timeout=args.timeout_s, capture_output=True)

        step = "replay of the first half"
        replay(0, half)
        step = "trainer start (publishes its start model)"
        trainer = Proc(
            root, "trainer", ["trainer", "--config", str(args.deploy / "trainer.toml")], trainer_env
        )
        procs.append(trainer)
        step = "server start (waits for the first published version)"
        server = Proc(root, "server", ["serve", "--config", str(args.deploy / "serve.toml")], server_env)
        procs.append(server)
        wait_for(lambda: read_ready(root / "server.ready"), args.timeout_s, "the server's ready file")

        client = LinkPredictionClient(f"127.0.0.1:{grpc_port}", timeout_s=10, retries=10)
        srcs, dsts = first_ids(args.data, half)
        pairs = list(zip(srcs[:50], dsts[-50:]))

        step = "first half applied"
        wait_for(lambda: client.model_info().events_applied >= half, args.timeout_s, "the first half")
        step = "Score and TopK"
        first = answers(client, pairs, srcs[0])
        print(
            f"served {first['model_version']} at {first['events_applied']} events: Score, TopK ok", flush=True
        )

        step = "second half, a new version published and swapped"
        replay(half, args.events - half)
        wait_for(
            lambda: (metric(server_metrics, "tgnstream_model_swaps_total", result="swapped") or 0) >= 1,
            args.timeout_s,
            "a version published by the trainer and swapped in by the server",
        )
        print(f"swapped to {client.model_info().model_version}", flush=True)

        step = "trainer SIGTERM"
        code, took = trainer.stop(timeout=60)
        if code != 0:
            raise CheckFailed(f"the trainer exited {code}")
        print(f"trainer stopped in {took:.1f} s, exit 0", flush=True)

        step = "server caught up with the stream and the newest version"
        newest = max(d.name for d in models_dir.iterdir() if (d / "manifest.json").exists())

        def caught_up() -> bool:
            info = client.model_info()
            return info.events_applied >= args.events and info.model_version == newest

        wait_for(caught_up, args.timeout_s, f"the whole stream served by {newest}")
        before = answers(client, pairs, srcs[0])
        client.close()
        step = "server SIGTERM (final snapshot)"
        code, took = server.stop(timeout=30)
        if code != 0 or "stopped in" not in server.log():
            raise CheckFailed(f"the server exited {code}")
        snapshots = sorted((data_dir / "snapshots").glob("snap-*"))
        if not snapshots:
            raise CheckFailed(f"no snapshot in {data_dir / 'snapshots'}")
        print(f"server stopped in {took:.1f} s, exit 0, final snapshot {snapshots[-1].name}", flush=True)

        step = "server restart from its snapshot"
        (root / "server.ready").unlink()
        server = Proc(
            root, "server-restarted", ["serve", "--config", str(args.deploy / "serve.toml")], server_env
        )
        procs.append(server)
        wait_for(lambda: read_ready(root / "server.ready"), args.timeout_s, "the restarted server")
        client = LinkPredictionClient(f"127.0.0.1:{grpc_port}", timeout_s=10, retries=10)
        after = answers(client, pairs, srcs[0])
        client.close()
        if after != before:
            raise CheckFailed(f"the restarted server answers differently:\n{before}\n{after}")
        print(f"restart exact: {after['model_version']} at {after['events_applied']} events", flush=True)
        code, took = server.stop(timeout=30)
        if code != 0:
            raise CheckFailed(f"the restarted server exited {code}")
    except (CheckFailed, subprocess.SubprocessError, OSError) as e:
        print(f"FAIL at step '{step}': {e}", flush=True)
        for proc in procs:
            print(f"----- {proc.name} log (last 3000 characters)\n{proc.log()[-3000:]}", flush=True)
        return 1
    finally:
        for proc in reversed(procs):
            proc.kill()
    print(
        "PASS: installed wheel, non-root, deploy configs: replay, Score, TopK, swap, SIGTERM, restart exact"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
