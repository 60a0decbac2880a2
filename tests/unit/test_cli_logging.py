"""Log lines written while a command shows a progress bar land on their own line, above the bar."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

from tgnstream.apps import cli


def test_a_log_line_under_a_progress_bar_does_not_split_it(monkeypatch, capsys):
    def command(args) -> int:
        bar = tqdm(total=10, file=sys.stderr, desc="catching up", mininterval=0)
        bar.update(3)
        logging.getLogger("some.library").warning("a library speaks")
        bar.update(3)
        bar.close()
        return 0

    monkeypatch.setattr(cli, "_run_trainer", command)
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)  # capsys's stderr
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    monkeypatch.setattr(root, "handlers", [console])
    assert cli.main(["trainer"]) == 0
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    assert "LOG a library speaks" in lines, err
    assert "catching up" in err  # the bar was drawn around it
