"""The README's code runs, .ci/run finds the README's test command, the install instructions and the
declared dependencies hold."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PEERS = {"cvxpylayers", "diffcp"}  # what tests and benchmarks compare cbo with


def test_readme_python_snippets_run():
    snippets = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert snippets
    for code in snippets:
        exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    indented = re.findall(r"^    (.*)$", README, flags=re.M)
    test_commands = [line for line in indented if "pytest" in line]
    demo_commands = [line for line in indented if "examples/quickstart.py" in line]
    assert len(demo_commands) == 1 and test_commands
    # .ci/run extracts the first indented pytest line: check it is the set-up + pytest one.
    extracted = subprocess.run(
        ["sed", "-n", r"s/^    \(.*pytest.*\)$/\1/p", str(ROOT / "README.md")], capture_output=True, text=True
    ).stdout.splitlines()[0]
    assert extracted == test_commands[0]
    assert "pip install torch==2.13.0" in extracted and "python -m pytest" in extracted
    assert "sed -n" in (ROOT / ".ci" / "run").read_text()


def test_readme_says_where_the_cpu_and_cuda_wheels_come_from():
    """`pip install torch==V` is the CPU wheel only where pip is configured for it: the README names
    PyTorch's CPU index and the form of its CUDA indexes, for the same torch version as its commands."""
    versions = set(re.findall(r"pip install torch==([\d.]+)", README))
    assert len(versions) == 1, versions
    version = versions.pop()
    assert f"pip install torch=={version} --index-url https://download.pytorch.org/whl/cpu" in README
    assert re.search(rf"pip install torch=={re.escape(version)} --index-url https://download\.pytorch\.org/whl/cu\d+",
                     README)


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> list[str]:
    project = _project()
    return [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def test_peers_are_an_extra_that_the_test_and_bench_extras_pull_in():
    project = _project()
    assert not PEERS & {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert {_name(r) for r in extras["peers"]} == PEERS
    assert "cbo[peers]" in extras["test"] and "cbo[peers]" in extras["bench"]


def test_every_dependency_has_a_tested_version_range():
    """A lower and an upper bound on each requirement (but the extras' references to cbo's own
    extras), and the installed version, where installed, inside it."""
    specifiers = pytest.importorskip("packaging.specifiers")
    from importlib.metadata import PackageNotFoundError, version
    for requirement in _requirements():
        if requirement.startswith("cbo["):
            continue
        spec = specifiers.SpecifierSet(requirement[len(re.match(r"[\w.\-\[\]]+", requirement).group()):])
        operators = {s.operator for s in spec}
        assert ">=" in operators and "<" in operators, f"{requirement}: give a tested range '>=low,<high'"
        try:
            installed = version(_name(requirement))
        except PackageNotFoundError:
            continue
        assert spec.contains(installed, prereleases=True), f"installed {_name(requirement)} {installed} not in {spec}"


def test_cbo_imports_without_the_peers():
    """Every module of cbo imports with cvxpylayers and diffcp blocked: nothing imports them at module level."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({sorted(PEERS)!r})); "
            "import importlib, pkgutil, cbo; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(cbo.__path__, 'cbo.')]")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
