"""Mutation score per module: how many small deliberate bugs (mutants) the module's own tests catch.

    .venv/bin/python -m tests.mutation                      # every module in MODULES
    .venv/bin/python -m tests.mutation nanochat/schedule.py # just these

For each module, mutmut (3.x) runs in its own copy of the tree, mutants/<module>/, with a
[tool.mutmut] section written for that module alone: it mutates only that file and runs only the
test files listed for it below, so one module takes minutes, not the hours the whole suite would.
The copy stays behind so a survivor can be read there: `cd mutants/<module> && ../../.venv/bin/mutmut
show NAME`. Prints one row per module: mutants, killed, timeout, survived, other (no tests, errors),
score = (killed + timeout) / mutants. Scores measured are recorded in tests/MUTATION.md.
Not part of the default test run (the file name does not match test_*.py).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "mutants"

# the modules where a silent bug costs most (issue 13), each with the tests that are about it
MODULES: dict[str, list[str]] = {
    "nanochat/calculator.py": ["tests/test_calculator.py"],
    "nanochat/schedule.py": ["tests/test_schedule.py"],
    "nanochat/sampling.py": ["tests/test_engine.py"],
    "tasks/answers.py": ["tests/test_tasks.py"],
    "nanochat/ops.py": ["tests/test_ops.py"],
    "nanochat/checkpoint.py": ["tests/test_checkpoint.py"],
    "nanochat/tokenizer.py": ["tests/test_tokenizer.py"],
    "scripts/chat_rl.py": ["tests/test_rl.py"],
}

# lines not mutated, per module, because no caller can observe them: mutants there would count as
# survivors that no test could ever kill
UNOBSERVABLE: dict[str, list[str]] = {
    # evaluate() turns every Refused into None by contract, so the message text never leaves the module
    "nanochat/calculator.py": [r"raise Refused\("],
}

# what the tests import or read; the rest of the tree (.venv, data, reports) stays out of the copy
COPIED = ["nanochat", "tasks", "scripts", "bench", "tests", "pyproject.toml"]


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


def statuses(work: Path) -> Counter:
    out = mutmut(work, "results", "--all", "true").stdout
    # lines read "    nanochat.x.x_f__mutmut_3: killed"
    return Counter(line.rsplit(":", 1)[1].strip() for line in out.splitlines() if ": " in line)


def measure(module: str, max_children: int) -> Counter:
    work = prepare(module, MODULES[module])
    print(f"== {module}: mutmut in {work.relative_to(ROOT)}, tests {' '.join(MODULES[module])}", flush=True)
    # mutmut's progress spinner goes to a log beside the copy, so the table stays readable
    with open(work / "mutmut.log", "w") as log:
        mutmut(work, "run", "--max-children", str(max_children), stdout=log)
    return statuses(work)


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
