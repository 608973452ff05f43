"""The README's two set-up commands are what users and CI run: keep them true.

CI (`.ci/run`) must run exactly the README's test command, and the README's main command must name a
script that exists. These checks fail as soon as one of the files changes without the other.
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)   # the first code block
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, f"the README should open with two commands, found {commands}"
    return commands


def test_ci_runs_the_readme_test_command():
    main, tests = readme_commands()
    assert "pytest" in tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert tests in ci, f"'.ci/run' does not run the README's test command:\n  {tests}"


def test_main_command_runs_a_script_of_the_project():
    main, _ = readme_commands()
    script = re.search(r"python (\S+\.py)", main).group(1)
    assert os.path.exists(os.path.join(ROOT, script)), f"the README's main command runs {script}, which is missing"


def test_every_command_named_in_the_project_runs_a_file_that_exists():
    """`python NAME.py` and `python -m PACKAGE.NAME` wherever users read them (README, docs, help texts,
    error messages, docstrings): a tool that moves without every mention moving with it fails here."""
    files = ["README.md", *(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")))]
    for folder in (".", "tools"):
        files += [os.path.join(folder, f) for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")]
    missing, seen = [], 0
    for name in files:
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        for script in re.findall(r"\bpython3? ([\w/]+\.py)\b", text):
            seen += 1
            if script[:-3].isupper():       # a placeholder (`python SCRIPT.py`)
                continue
            if not os.path.exists(os.path.join(ROOT, script)):
                missing.append(f"{name}: python {script}")
        for module in re.findall(r"\bpython3? -m (tools\.\w+)", text):
            seen += 1
            if module.split(".")[1].isupper():
                continue
            if not os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"):
                missing.append(f"{name}: python -m {module}")
    assert seen > 20, f"only {seen} commands found: has the pattern stopped matching?"
    assert not missing, "commands naming files that do not exist:\n  " + "\n  ".join(missing)
