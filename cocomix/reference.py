"""The documentation's reference pages, generated from the code so that they cannot drift:

    docs/reference/config.md   every config key: its dotted name, type, default and docstring
                               (cocomix/config.py's dataclasses and attribute docstrings)
    docs/reference/cli.md      every `cocomix` subcommand's --help (cocomix/cli.py's argparse parsers)

    python -m cocomix.reference          # rewrite both (tests/test_docs.py fails when they differ)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

import yaml

from cocomix.config import Config, Section, field_docs

PAGES = {"config": Path("docs/reference/config.md"), "cli": Path("docs/reference/cli.md")}


def _type_name(tp) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    return text.replace("typing.", "").replace("cocomix.config.", "")


def _md(text: str) -> str:
    """A docstring as one table cell: `<` and `>` outside code spans escaped (not HTML), pipes escaped."""
    parts = " ".join(text.split()).split("`")
    parts = [p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts)]
    return "`".join(parts).replace("|", "\\|")


def _default(value) -> str:
    if isinstance(value, Section):
        return ""
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip() + "`"


def config_reference() -> str:
    docs, hints = field_docs(), {}
    out = ["# Configuration reference", "",
           "Every key of an experiment config (YAML, or a dotted `key=value` override on the command line), "
           "generated from `cocomix/config.py` by `python -m cocomix.reference`. `cocomix config --config FILE` "
           "prints a resolved config with the same docstrings.", ""]

    def section(cls, prefix: str, instance) -> None:
        hints.setdefault(cls, typing.get_type_hints(cls))
        rows, subs = [], []
        for f in dataclasses.fields(cls):
            value = getattr(instance, f.name)
            if isinstance(value, Section) and dataclasses.fields(value):
                subs.append((type(value), f"{prefix}{f.name}.", value))
                continue
            doc = _md(docs.get(cls.__name__, {}).get(f.name, ""))
            kind = _type_name(hints[cls][f.name]).replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | `{kind}` | {_default(value).replace('|', chr(92) + '|')} | {doc} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            out.extend([f"## {title}", "", _md(cls.__doc__ or "").replace("\\|", "|"), "",
                        "| key | type | default | what |", "|---|---|---|---|", *rows, ""])
        for sub in subs:
            section(*sub)

    section(Config, "", Config())
    return "\n".join(out).rstrip() + "\n"


def cli_reference() -> str:
    from cocomix.cli import build_parser  # lazy: the CLI module is the top layer's

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix the width
    parser = build_parser()
    out = ["# CLI reference", "", "Every `cocomix` subcommand's `--help`, generated from `cocomix/cli.py` by "
           "`python -m cocomix.reference`.", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out += [f"## cocomix {name}", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def generate() -> dict[str, str]:
    return {"config": config_reference(), "cli": cli_reference()}


def main(root: Path = Path(".")) -> None:
    for name, text in generate().items():
        path = root / PAGES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
