"""docs/configuration.md is what scripts/gen_config_reference.py writes from the pydantic models
of the serve and trainer configs: a setting added, renamed or redescribed without regenerating
the reference fails here."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", ROOT / "scripts" / "gen_config_reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the script's dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


def test_configuration_reference_is_up_to_date():
    gen = _generator()
    expected = gen.render()
    current = DOC.read_text() if DOC.is_file() else ""
    assert current == expected, (
        f"docs/configuration.md is stale (the config models changed): run `{gen.REGENERATE}` and commit it"
    )


def test_every_section_and_key_is_documented():
    gen = _generator()
    text = DOC.read_text()
    for proc in gen.PROCESSES:
        cls = proc.load()
        env = gen.env_prefix(cls)
        for path, _model, rows in gen.walk(cls, None, (), env, gen.env_delimiter(cls)):
            for row in rows:
                assert row[0] in text and row[3] in text, (proc.command, path, row[0])


@pytest.mark.parametrize(
    ("module", "loader", "var", "value", "attr"),
    [
        (
            "tgnstream.apps.serve_config",
            "load_serve_config",
            "TGNSTREAM_SERVE_INGEST__KAFKA__TOPIC",
            "t2",
            ("ingest", "kafka", "topic"),
        ),
        (
            "tgnstream.apps.serve_config",
            "load_serve_config",
            "TGNSTREAM_SERVE_GRPC__PORT",
            "50052",
            ("grpc", "port"),
        ),
        (
            "tgnstream.trainer.continual_config",
            "load_trainer_config",
            "TGNSTREAM_TRAINER_STREAM__KAFKA__TOPIC",
            "t3",
            ("stream", "kafka", "topic"),
        ),
        (
            "tgnstream.trainer.continual_config",
            "load_trainer_config",
            "TGNSTREAM_TRAINER_METRICS_PORT",
            "9200",
            ("metrics_port",),
        ),
    ],
)
def test_documented_environment_variables_are_the_ones_read(monkeypatch, module, loader, var, value, attr):
    """The reference's variable names are the ones pydantic-settings reads."""
    assert f"`{var}`" in DOC.read_text()
    monkeypatch.setenv(var, value)
    cfg = getattr(importlib.import_module(module), loader)(None)
    for name in attr:
        cfg = getattr(cfg, name)
    assert str(cfg) == value


def test_generator_check_mode_names_the_command(tmp_path, capsys):
    gen = _generator()
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    assert gen.main(["--check", "--out", str(stale)]) == 1
    assert re.search(r"python scripts/gen_config_reference\.py", capsys.readouterr().err)
    assert gen.main(["--out", str(stale)]) == 0
    assert gen.main(["--check", "--out", str(stale)]) == 0
