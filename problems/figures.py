r"""The figures quoted in README.md and docs/*.md, kept equal to what the scripts print.

Every script whose output the documentation quotes (the examples, the
benchmarks, ``python -m problems.bolib``) ends with
``save_figures(__file__, figures, varies)``: the figures it prints, formatted
as the documentation quotes them, go to ``results/<name>.json`` in the
script's folder (``examples/results/``, ``benchmarks/results/``,
``problems/results/``; committed), together with the command that reruns it
(the script, or ``-m module``, and its command-line arguments). ``<name>`` is
the script's file name without ``.py``, unique across those folders. A quoted
figure is marked in the markdown by an HTML comment right after it, naming
the script and the figure (invisible once rendered)::

    validation utility 0.2961<!--portfolio.cbo.val_utility-->

The value is the run of word characters, ``.``, ``+``, ``-``, ``−``, ``%``,
``×`` and ``/`` (for ``n/a``) right before the comment: a unit after a space
(``542 µs``) is not part of it, so a script saves figures in the unit that the
page's table or sentence names. A script that can also run partially
(``--quick``, some sections) saves only its full runs, the ones the pages
quote.
``tests/test_docs.py`` checks every marked figure against the stored results
(fast), and reruns the examples to check that the stored results are what
they print (``-m slow``; the benchmarks take minutes and mostly measure
time, so that test leaves them out). After a change that moves the results,
one command reruns scripts and rewrites every marked figure::

    python -m problems.figures --run               # every example with stored results
    python -m problems.figures --run portfolio     # one script: an example or a benchmark (fast_path, bolib, ...)
    python -m problems.figures                     # only rewrite the markdown from the stored results

Figures that change from run to run (seconds, round-off-level residuals, the
commit a benchmark ran at) are recorded as ``varies``: quoted and rewritten
like the others, but not compared when the slow test reruns the script.
``CBO_RESULTS`` (a folder) redirects the results of a run, as that test does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = tuple(ROOT / folder / "results" for folder in ("examples", "benchmarks", "problems"))
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
MARK = re.compile(r"(?P<value>[\w.+\-−%×/]+)<!--(?P<key>[a-z_]+\.[\w.]+)-->")


def save_figures(script: str, figures: dict[str, str], varies: Iterable[str] = (),
                 arguments: list[str] | None = None) -> Path:
    """Write the ``figures`` of ``script`` (its ``__file__``) to its results file and return the path.

    Keys are ``[\\w.]+`` names within the script; values are strings of ``[\\w.+-−%×/]+``, exactly as quoted.
    ``varies`` names the figures that change from run to run. ``arguments``: the command-line arguments the
    script ran with (default ``sys.argv[1:]``), recorded so that ``--run`` repeats the same run.
    """
    varies = set(varies)
    bad = {key: value for key, value in figures.items()
           if not re.fullmatch(r"[\w.]+", key) or not MARK.fullmatch(f"{value}<!--x.{key}-->")}
    if bad or varies - set(figures):
        raise ValueError(f"figures must be [\\w.]+ keys with values of [\\w.+-−%×/]+ (no spaces), and varies a "
                         f"subset of them: {bad or varies - set(figures)}")
    script = Path(script).resolve()
    folder = Path(os.environ.get("CBO_RESULTS", script.parent / "results"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{script.stem}.json"
    command = [*rerun_command(script), *(sys.argv[1:] if arguments is None else arguments)]
    path.write_text(json.dumps({"command": command, "figures": figures, "varies": sorted(varies)},
                               indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def rerun_command(script: Path) -> list[str]:
    """What follows ``python`` to run ``script`` from the repository root: ``-m package.module`` for a module of
    a package (a folder with ``__init__.py``), else its path relative to the root."""
    relative = script.resolve().relative_to(ROOT)
    if (script.parent / "__init__.py").exists():
        return ["-m", ".".join(relative.with_suffix("").parts)]
    return [relative.as_posix()]


def table(rows: dict[str, dict], formats: dict[str, str]) -> dict[str, str]:
    """{"row.metric": value} of a table {row name: {metric: number}}, each metric formatted by its entry
    of ``formats`` (e.g. ".4f"); row names reduced to word characters ("cbo hyper-cleaned" -> "cbo_hyper_cleaned")."""
    return {f"{slug(name)}.{metric}": format(values[metric], spec)
            for name, values in rows.items() for metric, spec in formats.items()}


def slug(name: str) -> str:
    """``name`` reduced to word characters, for a key: "n=10, outer-loop steps" -> "n_10_outer_loop_steps"."""
    return re.sub(r"\W+", "_", name).strip("_")


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, never in exponent notation: 0.542, 1.26, 735, 1120."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else "n/a"
    magnitude = math.floor(math.log10(abs(value)))
    return f"{value:.{max(digits - 1 - magnitude, 0)}f}"


def commit() -> str:
    """The commit the code ran at: git's short HEAD, with "-dirty" where cbo/ has uncommitted changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--", "cbo") else "")


def stored(folders: Iterable[Path] = FOLDERS) -> dict[str, dict]:
    """{script name: {"command": [...], "figures": {...}, "varies": [...]}} of every results file in ``folders``."""
    results: dict[str, dict] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            if path.stem in results:
                raise ValueError(f"two scripts are named {path.stem} ({path} and another results folder): "
                                 "rename one, since a mark names the script by its file name alone")
            results[path.stem] = json.loads(path.read_text())
    return results


def examples(folders: Iterable[Path] = FOLDERS) -> list[str]:
    """The names of the stored results that an example (a script of examples/) printed."""
    return [name for name, result in stored(folders).items() if result["command"][0].startswith("examples/")]


def quoted_figures(folders: Iterable[Path] = FOLDERS) -> dict[str, str]:
    """{"script.key": value} of every stored figure: the values the markdown must quote."""
    return {f"{script}.{key}": value for script, result in stored(folders).items()
            for key, value in result["figures"].items()}


def marks(text: str) -> list[tuple[str, str]]:
    """(key, quoted value) of every marked figure in ``text``."""
    return [(m.group("key"), m.group("value")) for m in MARK.finditer(text)]


def drift(pages: Iterable[Path] = PAGES, folders: Iterable[Path] = FOLDERS) -> list[str]:
    """What disagrees: each marked figure whose value differs from the stored one, or has none stored."""
    figures = quoted_figures(folders)
    problems = []
    for page in pages:
        for key, value in marks(page.read_text()):
            if key not in figures:
                problems.append(f"{page.name}: {key} is marked but no script records it")
            elif figures[key] != value:
                problems.append(f"{page.name}: {key} quotes {value}, the script printed {figures[key]}")
    return problems


def rewrite(pages: Iterable[Path] = PAGES, folders: Iterable[Path] = FOLDERS) -> int:
    """Replace every marked figure by its stored value; returns the number of figures changed."""
    figures, changed = quoted_figures(folders), 0
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


def run_script(name: str, results: Path | None = None) -> None:
    """Rerun the script that stored the results ``name``, with its recorded arguments, from the repository root
    (its results to the folder ``results`` if given)."""
    known = stored()
    if name not in known:
        raise SystemExit(f"no stored results named {name}: run the script once by hand "
                         f"(known: {', '.join(sorted(known))})")
    command = known[name]["command"]
    print(f"+ python {' '.join(command)}", flush=True)
    env = {**os.environ, "MPLBACKEND": "Agg", **({"CBO_RESULTS": str(results)} if results else {})}
    subprocess.run([sys.executable, *command], cwd=ROOT, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="rerun scripts first")
    parser.add_argument("names", nargs="*",
                        help="scripts to rerun, by results name (default: every example with stored results)")
    args = parser.parse_args()
    if args.run:
        for name in args.names or examples():
            run_script(name)
    print(f"{rewrite()} marked figure(s) changed")
    for problem in drift():
        print(problem)


if __name__ == "__main__":
    main()
