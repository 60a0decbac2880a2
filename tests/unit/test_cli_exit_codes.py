"""One exit-status convention for every ``tgnstream`` command: 0 success, 1 a failure while
running, 2 a usage or configuration error, 3 the server unreachable, 130 interrupted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tgnstream.apps import cli


def test_the_codes():
    assert (cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_USAGE, cli.EXIT_UNREACHABLE, cli.EXIT_INTERRUPTED) == (
        0,
        1,
        2,
        3,
        130,
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no command
        ["nonsense"],
        ["query"],  # no query
        ["query", "info", "--bogus"],
        ["query", "topk"],  # SRC missing
        ["query", "--timeout", "soon", "info"],
        ["train", "--out", "x"],  # --data missing
        ["serve", "--log-level", "loud"],
    ],
)
def test_a_wrong_command_line_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == cli.EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


def test_help_and_version_exit_0(capsys):
    for argv in (["--help"], ["query", "info", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code in (0, None)
    assert "tgnstream" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--data", "/nonexistent/events.csv", "--topic", "t"],
        ["train", "--data", "/nonexistent/events.csv", "--out", "o"],
        ["baseline", "--data", "/nonexistent/events.csv", "--out", "o"],
        ["serve", "--config", "/nonexistent/serve.toml"],
        ["trainer", "--config", "/nonexistent/trainer.toml"],
        ["demo", "--data", "/nonexistent/events.csv"],
    ],
)
def test_a_missing_input_file_exits_2_before_anything_runs(argv, monkeypatch):
    for name in ("_run_train", "_run_baseline", "_run_serve", "_run_trainer"):
        monkeypatch.setattr(cli, name, lambda args: pytest.fail("ran despite a missing input file"))
    assert cli.main(argv) == cli.EXIT_USAGE


def test_query_argument_errors_exit_2(tmp_path):
    assert cli.main(["query", "--retries", "0", "score", "a", "b", "c"]) == cli.EXIT_USAGE  # odd
    assert cli.main(["query", "info", "--tls-cert", str(tmp_path / "c.pem")]) == cli.EXIT_USAGE  # no key
    missing = str(tmp_path / "ca.pem")
    assert cli.main(["query", "info", "--tls-ca", missing]) == cli.EXIT_USAGE


def test_unreachable_server_exits_3(capsys):
    rc = cli.main(["query", "info", "--target", "127.0.0.1:1", "--retries", "0", "--timeout", "5"])
    assert rc == cli.EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "Traceback" not in err


def test_command_results_and_interrupts(monkeypatch):
    monkeypatch.setattr(cli, "_run_serve", lambda args: 1)
    assert cli.main(["serve"]) == cli.EXIT_FAILURE

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_trainer", interrupted)
    assert cli.main(["trainer"]) == cli.EXIT_INTERRUPTED

    def invalid(args):
        raise ValueError("memory_dim must be > 0")

    monkeypatch.setattr(cli, "_run_trainer", invalid)
    assert cli.main(["trainer"]) == cli.EXIT_USAGE


def test_the_log_level_reaches_the_command(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_run_serve", lambda args: seen.setdefault("level", args.log_level) and 0)
    assert cli.main(["serve", "--log-level", "warning"]) == 0 and seen["level"] == "WARNING"
    seen.clear()
    assert cli.main(["-v", "serve"]) == 0 and seen["level"] == "DEBUG"
    seen.clear()
    monkeypatch.setattr(cli, "_run_serve", lambda args: 0 if args.log_level is None else 1)
    assert cli.main(["serve"]) == 0  # none given: the settings file's level applies


def test_entry_point_exit_status():
    """The statuses reach the shell through ``python -m tgnstream`` (the console script is
    the same ``main``)."""
    run = [sys.executable, "-m", "tgnstream"]
    assert subprocess.run([*run, "nonsense"], capture_output=True, timeout=60).returncode == 2
    down = subprocess.run(
        [*run, "query", "info", "--target", "127.0.0.1:1", "--retries", "0"], capture_output=True, timeout=60
    )
    assert down.returncode == 3
