r"""The figures quoted in README.md and docs/*.md, kept equal to what the scripts print.

Each example ends with ``save_figures(__file__, figures)``: the figures it prints,
formatted as the documentation quotes them, go to ``examples/results/<name>.json``
(committed). A quoted figure is marked in the markdown by an HTML comment
right after it, naming the script and the figure (invisible once rendered)::

    validation utility 0.2961<!--portfolio.cbo.val_utility-->

The value is the run of word characters, ``.``, ``+``, ``-``, ``−``, ``%`` and
``×`` right before the comment. ``tests/test_docs.py`` checks every marked figure
against the stored results (fast), and reruns the examples to check that the
stored results are what they print (``-m slow``). After a change that moves
the results, one command reruns the examples and rewrites every marked figure::

    python examples/figures.py --run            # all examples with stored results
    python examples/figures.py --run portfolio  # one example
    python examples/figures.py                  # only rewrite the markdown from the stored results

Figures that change from run to run (seconds, round-off-level residuals) are
recorded as ``varies``: quoted and rewritten like the others, but not compared
when the slow test reruns the script. ``CBO_RESULTS`` (a folder) redirects the
results of a run, as that test does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "results"
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
MARK = re.compile(r"(?P<value>[\w.+\-−%×]+)<!--(?P<key>[a-z_]+\.[\w.]+)-->")


def save_figures(script: str, figures: dict[str, str], varies: tuple[str, ...] = ()) -> Path:
    """Write the ``figures`` of ``script`` (its ``__file__``) to its results file and return the path.

    Keys are ``[\\w.]+`` names within the script; values are strings of ``[\\w.+-−%×]+``, exactly as quoted.
    ``varies`` names the figures that change from run to run.
    """
    bad = {key: value for key, value in figures.items()
           if not re.fullmatch(r"[\w.]+", key) or not MARK.fullmatch(f"{value}<!--x.{key}-->")}
    if bad or set(varies) - set(figures):
        raise ValueError(f"figures must be [\\w.]+ keys with values of [\\w.+-−%×]+ (no spaces), and varies a "
                         f"subset of them: {bad or set(varies) - set(figures)}")
    folder = Path(os.environ.get("CBO_RESULTS", RESULTS))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(script).stem}.json"
    path.write_text(json.dumps({"figures": figures, "varies": sorted(varies)}, indent=1, sort_keys=True) + "\n")
    return path


def table(rows: dict[str, dict], formats: dict[str, str]) -> dict[str, str]:
    """{"row.metric": value} of a table {row name: {metric: number}}, each metric formatted by its entry
    of ``formats`` (e.g. ".4f"); row names reduced to word characters ("cbo hyper-cleaned" -> "cbo_hyper_cleaned")."""
    return {f"{_slug(name)}.{metric}": format(values[metric], spec)
            for name, values in rows.items() for metric, spec in formats.items()}


def _slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def stored(folder: Path = RESULTS) -> dict[str, dict]:
    """{script name: {"figures": {...}, "varies": [...]}} of every results file in ``folder``."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def quoted_figures(folder: Path = RESULTS) -> dict[str, str]:
    """{"script.key": value} of every stored figure: the values the markdown must quote."""
    return {f"{script}.{key}": value for script, result in stored(folder).items()
            for key, value in result["figures"].items()}


def marks(text: str) -> list[tuple[str, str]]:
    """(key, quoted value) of every marked figure in ``text``."""
    return [(m.group("key"), m.group("value")) for m in MARK.finditer(text)]


def drift(pages=PAGES, folder: Path = RESULTS) -> list[str]:
    """What disagrees: each marked figure whose value differs from the stored one, or has none stored."""
    figures = quoted_figures(folder)
    problems = []
    for page in pages:
        for key, value in marks(page.read_text()):
            if key not in figures:
                problems.append(f"{page.name}: {key} is marked but no script records it")
            elif figures[key] != value:
                problems.append(f"{page.name}: {key} quotes {value}, the script printed {figures[key]}")
    return problems


def rewrite(pages=PAGES, folder: Path = RESULTS) -> int:
    """Replace every marked figure by its stored value; returns the number of figures changed."""
    figures, changed = quoted_figures(folder), 0
    for page in pages:
        text = page.read_text()

        def replaced(match: re.Match) -> str:
            nonlocal changed
            value = figures.get(match.group("key"), match.group("value"))
            changed += value != match.group("value")
            return f"{value}<!--{match.group('key')}-->"

        new = MARK.sub(replaced, text)
        if new != text:
            page.write_text(new)
    return changed


def run_example(name: str, results: Path | None = None) -> None:
    """Run ``examples/<name>.py`` from the repository root (its results to ``results`` if given)."""
    env = {**os.environ, "MPLBACKEND": "Agg", **({"CBO_RESULTS": str(results)} if results else {})}
    subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py")], cwd=ROOT, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="rerun the examples first")
    parser.add_argument("names", nargs="*", help="examples to rerun (default: all with stored results)")
    args = parser.parse_args()
    if args.run:
        for name in args.names or list(stored()):
            print(f"+ python examples/{name}.py", flush=True)
            run_example(name)
    print(f"{rewrite()} marked figure(s) changed")
    for problem in drift():
        print(problem)


if __name__ == "__main__":
    main()
