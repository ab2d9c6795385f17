"""The documentation: the site builds with `mkdocs build --strict` (every link and anchor
between pages resolves, no docstring the API reference renders has a warning), every page
in docs/ is in the navigation, and the links of README.md and the pages' links to files
of the repository point at files (and headings) that exist."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
GITHUB_FILE = re.compile(r"https://github\.com/fedjax-sim/fedjax_sim/blob/main/([^)#\s]+)(#[^)\s]*)?")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _pages():
    """Every Markdown page under docs/, relative to it."""
    return sorted(os.path.relpath(os.path.join(root, f), DOCS)
                  for root, _, files in os.walk(DOCS) for f in files if f.endswith(".md"))


def _nav_pages(nav):
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            if isinstance(value, list):
                yield from _nav_pages(value)
            else:
                yield value


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it (and MkDocs, for ASCII headings): lower case,
    punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", open(path).read(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def _check_target(source: str, path: str, anchor: str | None, problems: list):
    if not os.path.exists(path):
        problems.append(f"{source}: {os.path.relpath(path, REPO)} does not exist")
    elif anchor and path.endswith(".md") and anchor not in _anchors(path):
        problems.append(f"{source}: {os.path.relpath(path, REPO)} has no heading #{anchor}")


def test_every_page_is_in_the_nav():
    config = yaml.safe_load(open(os.path.join(REPO, "mkdocs.yml")))
    nav, pages = list(_nav_pages(config["nav"])), _pages()
    assert not set(pages) - set(nav), f"pages missing from the nav: {sorted(set(pages) - set(nav))}"
    assert not set(nav) - set(pages), f"nav entries without a page: {sorted(set(nav) - set(pages))}"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"


def test_readme_links_resolve():
    problems = []
    for target in LINK.findall(open(os.path.join(REPO, "README.md")).read()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        _check_target("README.md", os.path.join(REPO, path), anchor, problems)
    assert not problems, "\n".join(problems)


def test_docs_links_to_repository_files_resolve():
    """The pages link to files outside docs/ (benchmarks, scripts) by their GitHub address,
    which the site build cannot check."""
    problems = []
    for page in _pages():
        for path, anchor in GITHUB_FILE.findall(open(os.path.join(DOCS, page)).read()):
            _check_target(f"docs/{page}", os.path.join(REPO, path), anchor[1:], problems)
    assert not problems, "\n".join(problems)


def test_field_lists_get_a_section_header():
    """docs/griffe_field_lists.py turns `name: text` runs into Google sections, and leaves
    prose, single items and unknown names alone."""
    pytest.importorskip("griffe", reason="pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("field_lists",
                                                  os.path.join(DOCS, "griffe_field_lists.py"))
    field_lists = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(field_lists)
    text = ("What it is.\n\nrate: how fast\n  it learns.\nsize (CPU): how many.\n"
            "Returns something.\n\nrate: alone\n\nother: x\nsize: y")
    assert field_lists.with_field_lists(text, {"rate", "size"}, "Args:", for_class=False) == (
        "What it is.\n\nArgs:\n    rate: how fast\n        it learns.\n"
        "    size: (CPU) how many.\n\nReturns something.\n\nrate: alone\n\nother: x\nsize: y")
    fields = "init(params) -> state\nreduce(x: int) -> (a, b: c), or None: the default\n  sum."
    assert field_lists.with_field_lists(fields, {"init", "reduce"}, "Attributes:",
                                        for_class=True) == (
        "Attributes:\n    init: `init(params) -> state`\n"
        "    reduce: `reduce(x: int) -> (a, b: c), or None`: the default\n        sum.")


@pytest.mark.slow  # ~5 s of CPU, 9-13 s on a busy 2-core machine; .ci/run builds the site too
def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="pip install -e '.[docs]'")
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                          "-f", os.path.join(REPO, "mkdocs.yml"), "-d", str(site)],
                         cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    for page in _pages():
        html = "index.html" if page == "index.md" else page[:-3] + "/index.html"
        assert (site / html).is_file(), f"{page} was not built"

    # The API reference renders simulate's arguments (RunRequest's fields, documented as
    # `name: text` lines) as a table, one row per documented field.
    from fedjax_sim.simulation import RunRequest

    html = (site / "api" / "fedjax_sim" / "index.html").read_text()
    assert 'id="fedjax_sim.simulate"' in html
    section = html[html.index('id="fedjax_sim.simulation.RunRequest"'):]
    documented = [f.name for f in dataclasses.fields(RunRequest)
                  if re.search(rf"^\s*{f.name}: ", RunRequest.__doc__, re.M)]
    assert len(documented) > 20
    for name in documented:
        assert re.search(rf"<td><code>(<span[^>]*>)?{name}(</span>)?</code></td>", section), name
