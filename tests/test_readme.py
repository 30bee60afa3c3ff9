"""Every flag the README shows on a command is one that command takes.

The README is the user's manual: a command copied from it must not answer
"unknown option". Commands are read from its code blocks and inline `code`;
each flag must appear in the --help of the program it is given to (flags after
a stage script's `--` are checked against the Python entry point it launches).
Every NANOCHAT_* variable the code reads is in its "Environment variables" list.
"""

import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from nanochat.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
# stage scripts whose `--` passes flags on to a Python entry point
PASSES_ON = {stage.script: stage.module for stage in STAGES.values()}
NOT_CHECKED = ("pytest", "tests.mutation")  # the test runner's own flags


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = [line[4:] for line in text.splitlines() if line.startswith("    ")]
    inline = re.findall(r"`([^`\n]+)`", text)
    starts = ("./", "python ", ".venv/bin/python ", "torchrun ")
    commands = []
    for candidate in blocks + inline:
        for part in candidate.split("&&"):
            command = part.split("  #")[0].strip()
            complete = not command.startswith("torchrun") or " -m " in command  # not a fragment like `torchrun --standalone`
            if command.startswith(starts) and complete and not any(word in command for word in NOT_CHECKED):
                commands.append(command)
    return sorted(set(commands))


def program_and_flags(command: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """(the program to ask for --help, the flags given to it) pairs of one command."""
    words = shlex.split(command.replace("<", "").replace(">", ""))
    if words[0] == "torchrun":
        words = ["python", *words[words.index("-m"):]]
    if words[0].endswith("python"):
        if words[1] == "-m":
            program, rest = (sys.executable, "-m", words[2]), words[3:]
        else:
            program, rest = (sys.executable, words[1]), words[2:]
    else:
        program, rest = (words[0],), words[1:]
    inner = []
    if "--" in rest:
        rest, inner = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
    pairs = [(program, flags_of(rest))]
    if inner and program[0] in PASSES_ON:
        pairs.append(((sys.executable, "-m", PASSES_ON[program[0]]), flags_of(inner)))
    return pairs


def flags_of(words: list[str]) -> list[str]:
    # the original nanochat's spellings (--device_batch_size=32) are accepted: compare in ours
    return [word.split("=")[0].replace("_", "-") for word in words if word.startswith("-") and word != "-"]


@lru_cache(maxsize=None)
def help_of(program: tuple[str, ...]) -> str:
    done = subprocess.run([*program, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, f"{' '.join(program)} --help failed: {done.stderr[-500:]}"
    return done.stdout


def test_the_readme_shows_commands_of_every_kind():
    commands = readme_commands()
    assert any(c.startswith("./sft.sh") for c in commands) and any(c.startswith("python -m scripts.") for c in commands)
    assert any(" -- " in c and c.startswith("./pretrain.sh") for c in commands)


def check_flags(command: str) -> None:
    for program, flags in program_and_flags(command):
        if not flags:
            continue
        shown = set(re.findall(r"(?<![\w-])(-{1,2}[A-Za-z][\w-]*)", help_of(program)))
        unknown = [flag for flag in flags if flag not in shown]
        assert not unknown, f"{command!r}: {' '.join(program[-1:])} does not list {unknown} in its --help"


def stage_script_only(command: str) -> bool:
    """The bash scripts answer --help without starting Python; entry points take seconds each."""
    return command.startswith("./") and " -- " not in command


@pytest.mark.parametrize("command", [c for c in readme_commands() if stage_script_only(c)])
def test_every_flag_the_readme_shows_on_a_stage_script_is_taken(command):
    check_flags(command)


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in readme_commands() if not stage_script_only(c)])
def test_every_flag_the_readme_shows_on_an_entry_point_is_taken(command):
    check_flags(command)


# scripts/common.sh's name for the checkout: set there for the stage scripts, never read from the environment
NOT_A_SETTING = {"NANOCHAT_ROOT"}
MAX_VARIABLES = 5  # issue 27: a few knobs, each in the manual (the original nanochat reads 2)


def variables_in_the_code() -> set[str]:
    """Every NANOCHAT_* name the shipped Python and bash code spells (tests, the venv and git excluded)."""
    found = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in ("tests", "__pycache__")]
        for name in files:
            if name.endswith((".py", ".sh")):
                found |= set(re.findall(r"NANOCHAT_[A-Z][A-Z_]*[A-Z]", Path(folder, name).read_text(encoding="utf-8")))
    return found - NOT_A_SETTING


def test_every_environment_variable_is_in_the_readme_and_there_are_few():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(NANOCHAT_[A-Z_]+)`", section))
    assert variables_in_the_code() == documented
    assert len(documented) <= MAX_VARIABLES
