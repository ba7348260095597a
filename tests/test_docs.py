"""The manual and the README as a reader meets them: the params reference is what the schema
generates, every relative link and anchor of README.md resolves, every `lensflow …` line of a
code block is a command the parser accepts. (`make docs` builds the site with strict link and
anchor checks; `.ci/run` runs it.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

from cli.main import parser
from tests.conftest import REPO, documented_commands

PAGES = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\[\]]*\]\(([^)\s]+)\)")


def _params_reference():
    spec = importlib.util.spec_from_file_location(
        "params_reference", REPO / "docs/params_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_params_reference_is_what_the_schema_generates():
    assert (REPO / "docs/params.md").read_text() == _params_reference().render(), (
        "docs/params.md is stale: run `make docs`"
    )


def test_every_params_key_has_a_description():
    assert "|  |" not in _params_reference().render().replace("| `", "")


def _anchors(page: Path) -> set[str]:
    anchors, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(slugify(heading.group(1).replace("`", ""), "-"))
    return anchors


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_every_relative_link_and_anchor_in_the_readme_resolves():
    assert _broken_links(REPO / "README.md") == []


def test_the_link_checker_catches_a_missing_page_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/page.md").write_text("# Page\n\n## Some `code` heading\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md#some-code-heading) [a](docs/gone.md) [b](docs/page.md#nope) "
        "[web](https://example.org/x)"
    )
    assert _broken_links(readme) == [
        "docs/gone.md: no such file",
        "docs/page.md#nope: no heading with that anchor",
    ]


def test_the_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", [REPO / "README.md", *PAGES], ids=lambda p: p.name)
def test_every_documented_lensflow_command_parses(page):
    for args in documented_commands(page):
        try:
            parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{page.name}: `lensflow {' '.join(args)}` is not a valid command")


def test_documented_commands_are_found_and_a_wrong_one_would_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nlensflow run --set a.b=1 \\\n  --set c.d=2   # two overrides\n"
        "$ lensflow tune --trials many\n```\nlensflow outside a block\n"
    )
    run, tune = documented_commands(page)
    assert run == ["run", "--set", "a.b=1", "--set", "c.d=2"]
    with pytest.raises(SystemExit):
        parser().parse_args(tune)
