"""The stage registry is the one place that names stages, folders, scripts and report sections."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat import stages
from nanochat.report import SECTION_ORDER, SUMMARY_STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_each_stage_names_a_real_script_and_entry_point_and_continues_the_one_before():
    names = list(stages.STAGES)
    assert names == ["base", "mid", "sft", "rl"]
    for i, stage in enumerate(stages.STAGES.values()):
        assert (ROOT / stage.script).is_file(), stage.script
        assert callable(importlib.import_module(stage.module).main)
        assert stage.starts_from == (names[i - 1] if i else None)
    assert len({stage.folder for stage in stages.STAGES.values()}) == len(names)
    assert stages.AUTO_ORDER == ("rl", "sft", "mid", "base")
    assert stages.stage_of_folder("chatsft_checkpoints") == "sft" and stages.stage_of_folder("elsewhere") is None


def test_the_report_orders_its_sections_by_the_registry():
    for stage in stages.STAGES.values():
        positions = [SECTION_ORDER.index(section) for section in stage.sections]
        assert positions == sorted(positions)
    assert SUMMARY_STAGES == tuple(stages.STAGES)
    assert stages.chat_eval_section("sft") in stages.STAGES["sft"].sections


def test_the_cli_answers_the_bash_scripts():
    done = subprocess.run([sys.executable, "-m", "nanochat.stages", "folder", "sft"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "chatsft_checkpoints"


def test_each_stage_script_launches_its_entry_point():
    """The stage scripts name their module themselves (no Python start to look it up); the registry must agree."""
    for stage in stages.STAGES.values():
        assert stage.module in (ROOT / stage.script).read_text(), stage.script


@pytest.mark.parametrize("args", [[], ["folder"], ["folder", "chatsft"], ["colour", "base"], ["names"]])
def test_the_cli_refuses_what_it_does_not_know(args):
    assert stages.main(args) == 2


def code_lines(script: Path) -> list[str]:
    """A bash script's lines outside comments and here-documents (help text may name folders)."""
    lines, ending = [], None
    for line in script.read_text().splitlines():
        if ending is not None:
            ending = None if line.strip() == ending else ending
            continue
        opening = re.search(r"<<-?'?(\w+)'?", line)
        if opening:
            ending = opening.group(1)
        if not line.lstrip().startswith("#"):
            lines.append(line)
    return lines


def test_no_bash_script_spells_out_a_checkpoint_folder():
    scripts = [*ROOT.glob("*.sh"), *ROOT.glob("scripts/*.sh")]
    spelled = {path.name: re.findall(r"\b\w+_checkpoints\b", "\n".join(code_lines(path))) for path in scripts}
    assert not {name: found for name, found in spelled.items() if found}
    assert any("base_checkpoints" in line for line in (ROOT / "pretrain.sh").read_text().splitlines())  # its help still says where
