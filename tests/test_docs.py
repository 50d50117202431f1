"""The documentation: the site builds in strict mode (a broken link or a missing page fails), the reference
pages are what the code generates, the README stays short and keeps its two commands, the license and
citation files agree with pyproject, and every `cocomix` command the docs print parses as written (the
cheap ones run for real, offline)."""

import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import ROOT, doc_commands

PAGES_WITH_COMMANDS = ["README.md", "docs/quickstart.md", "docs/reproduce.md", "docs/fair.md", "docs/dag.md",
                       "docs/sweeps.md", "docs/cocomix.md", "docs/training.md", "docs/tracking.md", "docs/evaluation.md",
                       "docs/scale.md", "docs/cluster.md"]


def test_the_reference_pages_are_what_the_code_generates():
    from cocomix.reference import PAGES, generate

    for name, text in generate().items():
        assert (ROOT / PAGES[name]).read_text() == text, f"{PAGES[name]} is stale: run python -m cocomix.reference"


def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs not installed (pip install -e '.[docs]'; make test installs it)")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                          env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def test_readme_is_short_keeps_its_two_commands_and_the_license_and_citation_agree():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    assert re.search(r"^make run ", readme, re.M) and re.search(r"^make test ", readme, re.M)
    assert "make test" in (ROOT / ".ci/run").read_text()  # CI runs the README's test command
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["version"] == project["version"]
    assert "2502.08524" in cff["preferred-citation"]["url"]


def _commands() -> list[tuple[str, str]]:
    """(page, command) for every `cocomix ...` line of a bash block (continuation lines joined)."""
    return [(page, line) for page in PAGES_WITH_COMMANDS for line in doc_commands(page) if line.startswith("cocomix ")]


def test_every_cocomix_command_in_the_docs_parses_as_written():
    from cocomix.cli import parse_args

    commands = _commands()
    assert len(commands) >= 20
    for page, line in commands:
        argv = shlex.split(line)[1:]
        try:
            parse_args(argv)
        except SystemExit as e:
            if e.code == 0:  # --version, --help
                continue
            pytest.fail(f"{page}: `{line}` does not parse (exit {e.code})")


# Commands of the docs that run offline in seconds (fast tier); tests/test_dag.py runs every command of the quick
# start and the reproduce page that can run offline, on the CI DAG's outputs.
CHEAP = ("cocomix plan --config config/paper.yaml", "cocomix config --config config/tiny.yaml method=cocomix")


@pytest.mark.parametrize("line", CHEAP)
def test_the_cheap_commands_of_the_docs_run_as_written(line):
    assert any(cmd.startswith(line) for _, cmd in _commands()), f"{line!r} is no longer in the docs"
    proc = subprocess.run([sys.executable, "-m", "cocomix.cli", *shlex.split(line)[1:]], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_the_worked_example_of_adding_a_method_is_the_file_the_tests_train():
    page = (ROOT / "docs/development.md").read_text()
    block = re.search(r"## Adding a method: a worked example.*?```python\n(.*?)```", page, re.S).group(1)
    assert block == (ROOT / "baselines/ntp_zloss.py").read_text()
    assert "ntp_zloss" in (ROOT / "tests/test_methods.py").read_text()
