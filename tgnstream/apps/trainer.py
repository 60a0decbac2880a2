"""The continual trainer's process (``tgnstream trainer``): torch.distributed set-up, the
``TrainerService``, its health and metrics HTTP server, signals and the ready file."""

from __future__ import annotations

import json
import logging
import os
import signal

import torch

from tgnstream.runtime.health import HealthHttpServer
from tgnstream.runtime.sysinfo import resolve_device
from tgnstream.trainer.continual_config import TrainerConfig
from tgnstream.trainer.distributed import init_distributed
from tgnstream.trainer.service import TrainerService

__all__ = ["run_trainer"]

log = logging.getLogger("tgnstream.trainer.service")


def run_trainer(cfg: TrainerConfig) -> int:
    """``tgnstream trainer``: run until SIGTERM/SIGINT; 0 on a clean stop."""
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    rank, world = init_distributed(resolve_device(cfg.device))
    if world > 1:
        log.info("rank %d of %d (torch.distributed, %s)", rank, world, torch.distributed.get_backend())
    service = TrainerService(cfg, rank=rank, world=world)
    port = cfg.metrics_port + rank if cfg.metrics_port else 0
    http = HealthHttpServer(cfg.metrics_host, port, service.metrics.registry, service.readiness, lambda: True)
    http.start()

    def _stop(signum, frame):
        log.info("signal %d: stopping after the current step", signum)
        service.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    if cfg.ready_file is not None and rank == 0:
        cfg.ready_file.write_text(json.dumps({"metrics_port": http.port, "pid": os.getpid()}))
    log.info("trainer metrics on http://%s:%d/metrics", cfg.metrics_host, http.port)
    try:
        service.run()
    finally:
        http.stop()
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0
