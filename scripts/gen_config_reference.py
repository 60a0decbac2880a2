"""Write docs/configuration.md, the configuration reference, from the pydantic models of the
process configs (``tgnstream serve``: ``ServeConfig``; ``tgnstream trainer``: ``TrainerConfig``).

Every section (a nested model) gets a table: key, type, default, environment variable and the
field's description. The walk is generic (``model_fields``, recursively), so a new field or
section appears here by rerunning the script; ``--check`` (and
``tests/unit/test_config_reference.py``) fails when the file is stale.

    python scripts/gen_config_reference.py            # rewrite docs/configuration.md
    python scripts/gen_config_reference.py --check    # exit 1 when it differs
"""

from __future__ import annotations

import argparse
import enum
import importlib
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
REGENERATE = "python scripts/gen_config_reference.py"


@dataclass(frozen=True)
class Process:
    """One process kind's settings: its command, its config class and where it is documented."""

    command: str
    module: str
    cls: str
    example: str

    def load(self) -> type[BaseModel]:
        return getattr(importlib.import_module(self.module), self.cls)


PROCESSES = (
    Process("tgnstream serve", "tgnstream.apps.serve_config", "ServeConfig", "deploy/serve.toml"),
    Process(
        "tgnstream trainer", "tgnstream.trainer.continual_config", "TrainerConfig", "deploy/trainer.toml"
    ),
)


def env_prefix(cls: type[BaseModel]) -> str:
    return str(cls.model_config.get("env_prefix", "")).upper()


def env_delimiter(cls: type[BaseModel]) -> str:
    return str(cls.model_config.get("env_nested_delimiter") or "__")


def type_name(tp: Any) -> str:
    """A short, stable spelling of a field's annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names + (["None"] if type(None) in args else []))
    if origin is typing.Literal:
        return " \\| ".join(repr(a) if not isinstance(a, str) else f'"{a}"' for a in args)
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join(type_name(a) for a in args)}]" if args else base
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def default_of(info: FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


def show_default(value: Any) -> str:
    if value is PydanticUndefined:
        return "(required)"
    if value is None:
        return "None"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return repr(value.value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, Path):
        return f'"{value.as_posix()}"'
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e16 else f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    return repr(value)


def cell(text: str) -> str:
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def describe(info: FieldInfo) -> str:
    text = info.description or ""
    bounds = []
    for meta in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            v = getattr(meta, attr, None)
            if v is not None:
                bounds.append(f"{sign} {show_default(v)}")
    if bounds:
        text = (text + " " if text else "") + f"({', '.join(bounds)})"
    return cell(text)


def section_of(value: Any) -> BaseModel | None:
    """The nested model a field holds by default (a section), or None for a plain key."""
    return value if isinstance(value, BaseModel) else None


def walk(
    model: type[BaseModel], values: BaseModel | None, path: tuple[str, ...], env: str, delim: str
) -> list[tuple[tuple[str, ...], type[BaseModel], list[tuple[str, ...]]]]:
    """Sections depth first: (path, model class, rows); rows are the section's plain keys."""
    rows: list[tuple[str, ...]] = []
    nested: list = []
    for name, info in model.model_fields.items():
        value = getattr(values, name) if values is not None else default_of(info)
        sub = section_of(value)
        if sub is not None:
            nested.append((name, type(sub), sub))
            continue
        key = ".".join((*path, name))
        var = env + delim.join(p.upper() for p in (*path, name))
        rows.append(
            (
                f"`{key}`",
                f"`{type_name(info.annotation)}`",
                f"`{show_default(value)}`",
                f"`{var}`",
                describe(info),
            )
        )
    out = [(path, model, rows)]
    for name, cls, sub in nested:
        out += walk(cls, sub, (*path, name), env, delim)
    return out


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REGENERATE}` from the pydantic models; do not edit by hand. -->",
        "",
        "Each process reads one TOML or JSON file (`--config FILE`) plus environment variables, which",
        "win over the file: the variable of a key is the process's prefix, then the key's path in",
        "upper case with sections joined by `__`. `tgnstream serve --print-config` and `tgnstream",
        "trainer --print-config` show the settings a process would run with. Values: TOML syntax in",
        "the file; in the environment a plain value, or JSON for lists and tables.",
        "",
    ]
    for proc in PROCESSES:
        cls = proc.load()
        lines.append(
            f"- [`{proc.command}`](#{anchor(proc.command)}): `{cls.__module__}.{cls.__name__}`, "
            f"example [`{proc.example}`](../{proc.example})"
        )
    lines.append("")
    for proc in PROCESSES:
        cls = proc.load()
        env, delim = env_prefix(cls), env_delimiter(cls)
        lines += [
            f"## {proc.command}",
            "",
            cell((cls.__doc__ or "").strip()),
            "",
            f"Environment prefix `{env}`, nested delimiter `{delim}`.",
            "",
        ]
        for path, model, rows in walk(cls, None, (), env, delim):
            if not rows:
                continue
            title = f"`[{'.'.join(path)}]`" if path else "top level"
            lines += [f"### {proc.command}: {title}", ""]
            if path and model.__doc__ and model is not cls:
                lines += [cell(model.__doc__.strip()) + f" (`{model.__name__}`)", ""]
            lines += [
                "| key | type | default | environment variable | description |",
                "|---|---|---|---|---|",
            ]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def anchor(title: str) -> str:
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="gen_config_reference.py",
        description="Write docs/configuration.md from the pydantic models of the serve and trainer "
        "configs (ServeConfig, TrainerConfig and their nested sections).",
    )
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 when the file is stale")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output file (default: {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
