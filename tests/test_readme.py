"""The README's code runs, and .ci/run finds the README's test command."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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
