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
