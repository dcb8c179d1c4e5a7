"""Run cvxpylayers' own torch test file against cbo: ``from cbo import ArgminLayer as CvxpyLayer``.

    git clone https://github.com/cvxpy/cvxpylayers /tmp/cvxpylayers
    python benchmarks/cvxpylayers_suite.py /tmp/cvxpylayers        # a work tree or a bare git directory

The file ``tests/test_torch.py`` is copied to a temporary directory with its
``from cvxpylayers.torch import CvxpyLayer`` replaced, and run with pytest in
a separate process (it sets torch's default dtype to float64 at import). The
script prints each test's outcome, the first line of each failure, and the
counts. docs/layer.md explains the failures that are deliberate differences.
``pytest -m compat`` runs it from tests/test_compat_cvxpylayers.py with the
repository named by the environment variable ``CVXPYLAYERS_REPO``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from problems.figures import save_figures

TEST_FILE = "tests/test_torch.py"
ORIGINAL_IMPORT = "from cvxpylayers.torch import CvxpyLayer"
SWAPPED_IMPORT = "from cbo import ArgminLayer as CvxpyLayer"


def read_test_file(repo: Path) -> tuple[str, str]:
    """The text of cvxpylayers' torch tests and the commit it comes from ("unknown" for a work tree outside git)."""
    path = repo / TEST_FILE
    if path.exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return path.read_text(), head.stdout.strip() or "unknown"
    show = subprocess.run(["git", f"--git-dir={repo}", "show", f"HEAD:{TEST_FILE}"], capture_output=True, text=True)
    if show.returncode != 0:
        raise SystemExit(f"{repo} has no {TEST_FILE} (neither a cvxpylayers work tree nor its git directory).")
    commit = subprocess.run(["git", f"--git-dir={repo}", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return show.stdout, commit


def run_suite(repo: Path, timeout: float = 1800) -> tuple[dict[str, tuple[str, str]], str]:
    """{test name: (outcome, first line of the failure)} for cvxpylayers' tests with cbo's layer, and the commit."""
    text, commit = read_test_file(repo)
    if ORIGINAL_IMPORT not in text:
        raise SystemExit(f"{TEST_FILE} no longer imports `{ORIGINAL_IMPORT}`: update this script.")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "test_torch_with_cbo.py"
        target.write_text(text.replace(ORIGINAL_IMPORT, SWAPPED_IMPORT))
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        f"--junitxml={report}", str(target)], cwd=tmp, capture_output=True, timeout=timeout)
        return _outcomes(ET.parse(report)), commit


def _outcomes(tree: ET.ElementTree) -> dict[str, tuple[str, str]]:
    results = {}
    for case in tree.iter("testcase"):
        outcome, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                why = (found.get("message") or "").splitlines()[0][:160] if found.get("message") else ""
        results[case.get("name")] = (outcome, why)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="cvxpylayers work tree or bare git directory")
    args = parser.parse_args()
    results, commit = run_suite(args.repo)
    print(f"cvxpylayers {TEST_FILE} at {commit}, with `{SWAPPED_IMPORT}`:")
    for name, (outcome, why) in results.items():
        print(f"  {outcome:8s} {name}{'  -- ' + why if why and outcome != 'passed' else ''}")
    counts = {o: sum(1 for r, _ in results.values() if r == o) for o in ("passed", "failed", "error", "skipped")}
    print(", ".join(f"{n} {o}" for o, n in counts.items()) + f" of {len(results)}")
    figures = {"commit": commit, "total": str(len(results)), **{o: str(n) for o, n in counts.items()}}
    print(f"figures quoted by the documentation (docs/layer.md): {save_figures(__file__, figures, ['commit'])}")


if __name__ == "__main__":
    main()
