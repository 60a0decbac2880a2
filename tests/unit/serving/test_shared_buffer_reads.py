"""Reads of shared state while another party writes it must be memory-safe, not only
discarded by the sequence check: an operation that counts, allocates and then fills (CPU
``nonzero``) would write past its output if the count changed between its passes. This ran in
reader processes (TopK's default candidates) and corrupted their heap under load."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import threading, torch
    from tgnstream.core.config import ModelConfig
    from tgnstream.core.engine import MemoryEngine

    torch.set_num_threads(1)
    engine = MemoryEngine(ModelConfig.preset("tgn", width=4, num_neighbors=2), 2_000_000)
    flags = engine.memory.is_destination
    stop = threading.Event()

    def writer():  # another process's writes, as a reader of shared state sees them
        g = torch.Generator().manual_seed(0)
        while not stop.is_set():
            flags[torch.randint(0, flags.numel(), (50_000,), generator=g)] = True
            flags[torch.randint(0, flags.numel(), (50_000,), generator=g)] = False

    w = threading.Thread(target=writer)
    w.start()
    try:
        for _ in range(200):
            d = engine.destinations()
            assert d.dim() == 1 and bool((d[1:] > d[:-1]).all()), "sorted, distinct ids"
    finally:
        stop.set()
        w.join()
    print("ok")
    """
)


def test_destinations_of_a_buffer_written_concurrently_never_corrupt_memory():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
