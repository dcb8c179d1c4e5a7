"""The documentation's code runs, its links and images exist, and the site builds.

Every ```python block of docs/*.md is executed; the blocks of one page share a
namespace and run in order, in a temporary working directory. A line
``--8<-- "path"`` (pymdownx.snippets, as the site renders it) is replaced by
the file at ``path``, relative to the repository root, and the block runs with
``__name__ != "__main__"``, so an included script defines its functions
without running its main. The strict mkdocs build needs the ``docs`` extra and
is skipped without it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
EXPECTED_PAGES = {"index.md", "math.md", "methods.md", "layer.md", "driver.md", "conic.md", "examples.md", "api.md"}

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
INCLUDE = re.compile(r'^--8<--[ \t]+"([^"]+)"[ \t]*$', re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _load_figures():
    """problems/figures.py, the record of the figures the documentation quotes (loaded alone: without the
    imports of the problems package)."""
    spec = importlib.util.spec_from_file_location("figures", ROOT / "problems" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIGURES = _load_figures()


def python_blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


def test_every_page_is_there_and_in_the_nav():
    assert EXPECTED_PAGES <= {p.name for p in PAGES}
    config = (ROOT / "mkdocs.yml").read_text()
    for name in EXPECTED_PAGES:
        assert f": {name}" in config, f"{name} is not in mkdocs.yml's nav"


@pytest.mark.filterwarnings("ignore::cbo.errors.DegenerateKKTWarning")  # the examples pass weakly active points
@pytest.mark.parametrize("page", [p.name for p in PAGES if python_blocks(p)])
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CBO_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for number, block in enumerate(python_blocks(DOCS / page), start=1):
        included = INCLUDE.findall(block)
        for path in included:
            assert (ROOT / path).is_file(), f"{page}: included file {path} not found"
            namespace["__file__"] = str(ROOT / path)
        code = INCLUDE.sub(lambda m: (ROOT / m.group(1)).read_text(), block)
        name = f"{page}, python block {number}" + (f" ({', '.join(included)})" if included else "")
        exec(compile(code, name, "exec"), namespace)


def test_relative_links_and_images_exist():
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        for target in LINK.findall(text):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            path = target.split("#", 1)[0]
            assert (DOCS / path).exists(), f"{page.name} links to missing {target}"


def test_index_has_the_readmes_commands():
    readme = (ROOT / "README.md").read_text()
    indented = re.findall(r"^    (.*)$", readme, flags=re.M)
    commands = [line for line in indented if "pip install torch" in line and ("pytest" in line or "quickstart" in line)]
    assert len(commands) == 2
    index = (DOCS / "index.md").read_text()
    for command in commands:
        assert command in index, f"docs/index.md lacks the README's command: {command}"


def test_docs_extra_is_declared():
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^docs = \[(.*)\]$", pyproject, flags=re.M)
    assert extra and "mkdocs" in extra.group(1) and "mkdocstrings[python]" in extra.group(1)


def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material", "pymdownx"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (site / "api" / "index.html").read_text()
    for name in ("hypergrad", "BilevelProblem", "ArgminLayer", "fixed_point_hypergrad", "HypergradInfo",
                 "LayerInfo", "ConvergenceError", "solve_projected_cg"):
        assert 'id="cbo.' in api and name in api, f"API page lacks {name}"
    assert ":func:" not in api and ":class:" not in api, "Sphinx roles left unrendered"


def test_every_marked_figure_is_the_one_its_script_printed():
    """Each figure marked ``value<!--script.key-->`` in README.md and docs/*.md equals the stored output of
    its script (results/script.json beside the script). To update: python -m problems.figures --run [script]."""
    assert FIGURES.marks((ROOT / "README.md").read_text()), "README.md quotes no marked figure"
    assert not FIGURES.drift(), "\n".join(FIGURES.drift())


def test_figure_marks_are_read_and_rewritten(tmp_path):
    results, page = tmp_path / "results", tmp_path / "page.md"
    results.mkdir()
    (results / "demo.json").write_text(json.dumps({"command": ["examples/demo.py"], "figures": {"a.b": "-0.25", "n": "3"},
                                                  "varies": []}))
    page.write_text("| F -0.2712<!--demo.a.b--> | (n = 2–4<!--demo.n-->) | 5.0<!--demo.gone--> |")
    assert FIGURES.marks(page.read_text()) == [("demo.a.b", "-0.2712"), ("demo.n", "4"), ("demo.gone", "5.0")]
    assert len(FIGURES.drift([page], [results])) == 3
    assert FIGURES.rewrite([page], [results]) == 2
    assert page.read_text() == "| F -0.25<!--demo.a.b--> | (n = 2–3<!--demo.n-->) | 5.0<!--demo.gone--> |"
    assert FIGURES.drift([page], [results]) == ["page.md: demo.gone is marked but no script records it"]


# Results quoted in these pages must be marked; these decimals are inputs (settings, data), not results.
INPUTS = {"C = 0.001", "e = 0.5", "γ = 0.05"}
DECIMAL = re.compile(r"(?<![\w.$\\])(?:[^\s(]+ = )?\d+\.\d+(?:e[-+]?\d+)?(?![\w.+\-−%×/]*<!--)")
UNQUOTED = re.compile(r"^```.*?^```|\$\$.*?\$\$|\$[^$]+\$|`[^`\n]*`|^    .*?$", re.S | re.M)
# The pages (or, for README, the sections) that quote what the examples and the benchmarks print.
QUOTING_PAGES = ("examples.md", "speed.md", "methods.md", "conic.md", "driver.md", "experiments.md", "layer.md")
QUOTING_README_SECTIONS = (("## Gallery", "## Use"), ("## Speed", None))


def quoting_texts() -> dict[str, str]:
    """{name: text} of README's gallery, Speed and Benchmarks sections and of :data:`QUOTING_PAGES`."""
    readme = (ROOT / "README.md").read_text()
    texts = {f"README.md, {start}": readme[readme.index(start):readme.index(end) if end else None]
             for start, end in QUOTING_README_SECTIONS}
    return texts | {f"docs/{page}": (DOCS / page).read_text() for page in QUOTING_PAGES}


def test_every_result_in_the_quoting_pages_is_marked():
    """No unmarked decimal in README's gallery, Speed and Benchmarks sections, docs/examples.md and the pages
    that quote the benchmarks (code and math aside): a result quoted there must be marked (problems/figures.py),
    or, if it is an input, listed in INPUTS."""
    unmarked = [(name, number) for name, text in quoting_texts().items()
                for number in DECIMAL.findall(UNQUOTED.sub("", text)) if number not in INPUTS]
    assert not unmarked, unmarked


def test_every_stored_result_is_quoted():
    """Each results file (an example's or a benchmark's) is quoted by at least one marked figure: no script
    saves figures that no page shows."""
    quoted = {key.split(".", 1)[0] for page in FIGURES.PAGES for key, _ in FIGURES.marks(page.read_text())}
    assert set(FIGURES.stored()) <= quoted, set(FIGURES.stored()) - quoted


@pytest.mark.slow
@pytest.mark.parametrize("name", FIGURES.examples())
def test_example_prints_its_stored_figures(name, tmp_path):
    """Rerun the example: it prints the stored figures (but those recorded as varying from run to run). Only
    the examples: the benchmarks' results (benchmarks/results/, problems/results/) take minutes to rerun and are
    mostly timings; the fast test checks their marks against the stored results."""
    FIGURES.run_script(name, tmp_path)
    fresh, kept = FIGURES.stored([tmp_path])[name], FIGURES.stored()[name]
    steady = set(kept["figures"]) - set(kept["varies"])
    assert {k: fresh["figures"].get(k) for k in steady} == {k: kept["figures"][k] for k in steady}
