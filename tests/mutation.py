"""Mutation score per module: how many small deliberate bugs (mutants) the module's own tests catch.

    .venv/bin/python -m tests.mutation                      # every module in MODULES
    .venv/bin/python -m tests.mutation nanochat/schedule.py # just these

For each module, mutmut (3.x) runs in its own copy of the tree, mutants/<module>/, with a
[tool.mutmut] section written for that module alone: it mutates only that file and runs only the
test files listed for it below, so one module takes minutes, not the hours the whole suite would.
Where a module holds more than the part that matters here, only the functions listed are mutated
and counted.
The copy stays behind so a survivor can be read there: `cd mutants/<module> && ../../.venv/bin/mutmut
show NAME`. Prints one row per module: mutants, killed, timeout, survived, other (no tests, errors),
score = (killed + timeout) / mutants. Scores measured are recorded in tests/MUTATION.md.
Not part of the default test run (the file name does not match test_*.py).
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants"


@dataclass(frozen=True)
class Target:
    tests: list[str]  # the test files about the module, run for each of its mutants
    # only these functions are mutated and counted ("Class.method", "Class.*" or "function"), where the
    # module holds more than the part issue 13 names (the rest is tested elsewhere, at other cost)
    functions: list[str] | None = None


# the modules where a silent bug costs most (issue 13), each with the tests that are about it
MODULES: dict[str, Target] = {
    "nanochat/calculator.py": Target(["tests/test_calculator.py"]),
    "nanochat/schedule.py": Target(["tests/test_schedule.py"]),
    "nanochat/sampling.py": Target(["tests/test_sampling.py"]),
    "tasks/answers.py": Target(["tests/test_tasks.py"]),
    # MMLU's and ARC's answer letters: the question as lettered options, the letter scored
    "tasks/multiple_choice.py": Target(["tests/test_multiple_choice.py", "tests/test_tasks.py"]),
    "tasks/arc.py": Target(["tests/test_multiple_choice.py", "tests/test_tasks.py"]),
    "nanochat/ops.py": Target(["tests/test_ops.py"]),
    "nanochat/checkpoint.py": Target(["tests/test_checkpoint.py", "tests/test_checkpoint_models.py"]),
    # the format (roles, tokens, parts, structure checks, the transformers template)
    "nanochat/conversation.py": Target(["tests/test_conversation.py", "tests/test_render_mask.py"]),
    # the renderer and its mask; training and the files are tests/test_tokenizer.py's
    "nanochat/tokenizer.py": Target(["tests/test_render_mask.py"], functions=[
        "Tokenizer.render_conversation", "Tokenizer.render_for_completion", "Tokenizer._render",
        "Tokenizer._user_pieces", "Tokenizer._assistant_pieces", "_chat_messages"]),
    # the advantage, the tokens that carry loss, the loss, pass@k; the entry point around them runs in
    # the stage tests (tests/test_posttrain.py), minutes per run
    "scripts/chat_rl.py": Target(["tests/test_rl.py"], functions=["Rollouts.*", "policy_gradient_loss", "pass_at_k"]),
}


def mutant_globs(module: str) -> list[str]:
    """mutmut's names for the mutants of a target's functions: pkg.mod.x_func__mutmut_3,
    pkg.mod.xǁClassǁmethod__mutmut_3 (empty: the whole module)."""
    dotted = module.removesuffix(".py").replace("/", ".")
    globs = []
    for name in MODULES[module].functions or []:
        cls, _, func = name.rpartition(".")
        globs.append(f"{dotted}.xǁ{cls}ǁ{func}__mutmut_*" if cls else f"{dotted}.x_{func}__mutmut_*")
    return globs


# lines not mutated, per module, because no caller can observe them: mutants there would count as
# survivors that no test could ever kill
UNOBSERVABLE: dict[str, list[str]] = {
    # evaluate() turns every Refused into None by contract, so the message text never leaves the module
    "nanochat/calculator.py": [r"raise Refused\("],
}

# what the tests import or read; the rest of the tree (.venv, data, reports) stays out of the copy
COPIED = ["nanochat", "tasks", "serving", "sharing", "scripts", "bench", "tests", "pyproject.toml"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"paths from the repo root (default: all of {', '.join(MODULES)})")
    parser.add_argument("--max-children", type=int, default=2, help="mutants run at once (default 2: the project VM's cores)")
    return parser.parse_args(argv)


def mutmut_config(module: str, tests: list[str]) -> str:
    skipped = [p.replace("\\", "\\\\") for p in UNOBSERVABLE.get(module, [])]  # TOML basic strings escape backslashes
    # source_paths names whole packages so every import resolves inside mutants/; only_mutate narrows
    # the mutation to the one file
    quoted = lambda items: "[" + ", ".join(f'"{x}"' for x in items) + "]"
    return (
        "\n[tool.mutmut]\n"
        f"source_paths = {quoted(['nanochat', 'tasks', 'scripts'])}\n"
        f"only_mutate = {quoted([module])}\n"
        f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
        f"do_not_mutate_patterns = {quoted(skipped)}\n"
        # mutants forked straight from a process that ran torch hang (its thread pools do not survive fork)
        'process_isolation = "forkserver"\n'
        # the default run's addopts keep slow tests out here too; -x: one failure is enough to kill a mutant
        'pytest_add_cli_args = ["-x", "-q", "-p", "no:cacheprovider"]\n'
    )


def prepare(module: str, tests: list[str]) -> Path:
    work = WORK / module.replace("/", "_").removesuffix(".py")
    if work.exists():
        shutil.rmtree(work)  # a fresh copy: mutmut would otherwise reuse results of older code
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=ignore)
        else:
            shutil.copy2(src, work / name)
    pyproject = work / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + mutmut_config(module, tests))
    return work


def mutmut(work: Path, *args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mutmut"
    return subprocess.run([str(exe), *args], cwd=work, text=True, stdout=stdout, stderr=subprocess.STDOUT)


def statuses(work: Path, globs: list[str]) -> Counter:
    out = mutmut(work, "results", "--all", "true").stdout
    # lines read "    nanochat.x.x_f__mutmut_3: killed"
    rows = (line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)
    return Counter(status for name, status in rows if not globs or any(fnmatch.fnmatchcase(name, g) for g in globs))


def measure(module: str, max_children: int) -> Counter:
    target = MODULES[module]
    work = prepare(module, target.tests)
    scope = f", functions {' '.join(target.functions)}" if target.functions else ""
    print(f"== {module}: mutmut in {work.relative_to(ROOT)}, tests {' '.join(target.tests)}{scope}", flush=True)
    globs = mutant_globs(module)
    # mutmut's progress spinner goes to a log beside the copy, so the table stays readable
    with open(work / "mutmut.log", "w") as log:
        mutmut(work, "run", "--max-children", str(max_children), *globs, stdout=log)
    return statuses(work, globs)


def table(rows: dict[str, Counter]) -> str:
    # a timeout counts as caught: that mutant makes a test hang, and a hung test fails (pytest-timeout)
    lines = [f"{'module':<26} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'other':>5} {'score':>6}"]
    for module, counts in rows.items():
        total = sum(counts.values())
        killed, timeout, survived = counts["killed"], counts["timeout"], counts["survived"]
        score = f"{100 * (killed + timeout) / total:.0f}%" if total else "-"
        other = total - killed - timeout - survived
        lines.append(f"{module:<26} {total:>7} {killed:>6} {timeout:>7} {survived:>8} {other:>5} {score:>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        print(f"not a module this command knows: {' '.join(unknown)}; known: {' '.join(MODULES)}", file=sys.stderr)
        return 2
    if shutil.which("mutmut", path=str(Path(sys.executable).parent)) is None:
        print("mutmut is missing: .venv/bin/pip install -e '.[dev]'", file=sys.stderr)
        return 2
    rows = {m: measure(m, args.max_children) for m in (args.modules or MODULES)}
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
