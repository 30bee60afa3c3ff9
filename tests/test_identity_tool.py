"""view_identity_data.py: round trips, validation by line number, refusals, byte-exact atomic edits."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tool lives at the repo root, outside the package
import view_identity_data as tool  # noqa: E402
from nanochat import fileio  # noqa: E402


def conversation(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


def jsonl(*conversations) -> bytes:
    return b"".join(json.dumps(c).encode() + b"\n" for c in conversations)


@pytest.fixture(autouse=True)
def no_identity_override(monkeypatch):
    """The default file is the one under $NANOCHAT_BASE_DIR unless a test says otherwise."""
    monkeypatch.delenv("NANOCHAT_TASK_DATA", raising=False)


@pytest.fixture
def identity_file(base_dir) -> Path:
    """The default file, with two conversations; the second has an odd key order and spacing to keep."""
    base_dir.mkdir(parents=True, exist_ok=True)
    path = base_dir / "identity_conversations.jsonl"
    quirky = b'{ "messages" : [{"content": "What is your name?", "role": "user"}, {"role": "assistant", "content": "nanochat \\u2728"}] , "id": 7}\n'
    path.write_bytes(jsonl(conversation("Who are you?", "I am nanochat, a small model.")) + quirky)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = tool.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "messages, valid",
    [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], True),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}], True),
        ("hi", False),
        ([], False),
        (["hi"], False),
        ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], False),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], False),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], False),
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], False),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}], False),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], False),
    ],
)
def test_problem_with(messages, valid):
    problem = tool.problem_with(messages)
    assert (problem is None) == valid, problem


def test_assistant_parts_are_shown_and_searched(tmp_path, capsys):
    parts = [{"type": "text", "text": "It is "}, {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}, {"type": "text", "text": "."}]
    path = write_input(tmp_path, jsonl({"messages": [{"role": "user", "content": "6 times 7?"}, {"role": "assistant", "content": parts}]}))
    assert run(capsys, "--file", str(path), "validate")[0] == 0
    assert "It is <<6*7=42>>." in run(capsys, "--file", str(path), "show", "1")[1]
    assert run(capsys, "--file", str(path), "search", "6*7=42")[0] == 0


def test_round_trip(identity_file, capsys):
    code, out, _ = run(capsys, "add", "--from", str(write_input(identity_file.parent, jsonl(conversation("Are you GPT-4?", "No, I am nanochat.")))))
    assert code == 0 and "line 3" in out
    code, out, _ = run(capsys, "count")
    assert (code, out) == (0, "3\n")
    code, out, _ = run(capsys, "list")
    rows = out.splitlines()[1:]
    assert code == 0 and len(rows) == 3 and rows[2].split()[:2] == ["3", "2"] and "Are you GPT-4?" in rows[2]
    code, out, _ = run(capsys, "show", "2")
    assert code == 0 and "[assistant]\nnanochat \u2728" in out
    code, out, _ = run(capsys, "search", "NANOCHAT")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["1", "2", "3"]
    code, out, _ = run(capsys, "remove", "3")
    assert code == 0 and "Are you GPT-4?" in out
    code, out, _ = run(capsys, "count")
    assert out == "2\n"


def write_input(folder: Path, data: bytes, name: str = "new.jsonl") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def test_add_from_json_list_and_single_object(identity_file, capsys):
    as_list = write_input(identity_file.parent, json.dumps([conversation("a", "b"), conversation("c", "d", system="s")]).encode(), "list.json")
    assert run(capsys, "add", "--from", str(as_list))[0] == 0
    one = write_input(identity_file.parent, json.dumps(conversation("e", "f"), indent=2).encode(), "one.json")
    assert run(capsys, "add", "--from", str(one))[0] == 0
    assert run(capsys, "count")[1] == "5\n"
    assert run(capsys, "validate")[0] == 0


def test_search_without_match_exits_1(identity_file, capsys):
    code, out, err = run(capsys, "search", "quantum")
    assert code == 1 and out == "" and "no conversation mentions 'quantum'" in err


def test_validate_reports_each_broken_line_by_number(identity_file, capsys):
    lines = [
        conversation("hi", "hello"),
        conversation("ok", "fine"),
        None,  # line 3: bad JSON
        conversation("x", "y"),
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # line 5: no alternation
        [1, 2],  # line 6: not an object
        {"turns": []},  # line 7: no messages
    ]
    text = "".join(('{"messages": [' if item is None else json.dumps(item)) + "\n" for item in lines)
    identity_file.write_text(text + "\n")  # a trailing blank line is not a conversation
    code, out, err = run(capsys, "validate")
    assert code == 1
    reported = [line.split(":")[1] for line in out.splitlines()]
    assert reported == ["3", "5", "6", "7"]
    assert f"{identity_file}:3: invalid JSON" in out
    assert out.splitlines()[1].startswith(f"{identity_file}:5: ") and "assistant" in out.splitlines()[1]
    assert "4 of 7 conversations have problems" in err


def test_validate_clean_file(identity_file, capsys):
    code, out, _ = run(capsys, "validate")
    assert code == 0 and "all 2 conversations are valid" in out


def test_add_refuses_invalid_input_and_leaves_file_unchanged(identity_file, capsys):
    before = identity_file.read_bytes()
    bad = write_input(identity_file.parent, jsonl(conversation("fine", "ok")) + b'{"messages": [{"role": "assistant", "content": "me first"}]}\n')
    code, _, err = run(capsys, "add", "--from", str(bad))
    assert code == 1 and "refusing to add" in err and f"{bad}:2: " in err
    assert identity_file.read_bytes() == before
    assert temp_files(identity_file.parent) == []


def test_edits_keep_other_lines_byte_for_byte(identity_file, capsys):
    # CRLF ending, non-ASCII, odd spacing and a last line without newline must all survive
    odd = b'{"messages":[{"role":"user","content":"h\xc3\xa9"},{"role":"assistant","content":"ok"}]}\r\n'
    last = b'  {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    original = identity_file.read_bytes() + odd + last
    identity_file.write_bytes(original)
    assert run(capsys, "validate")[0] == 0
    assert run(capsys, "remove", "1")[0] == 0
    kept = original.split(b"\n", 1)[1]
    assert identity_file.read_bytes() == kept
    assert run(capsys, "add", "--from", str(write_input(identity_file.parent, jsonl(conversation("new", "one")))))[0] == 0
    data = identity_file.read_bytes()
    assert data.startswith(kept + b"\n") and data.endswith(b'"new"}, {"role": "assistant", "content": "one"}]}\n')
    assert run(capsys, "count")[1] == "4\n"


def test_writes_are_atomic(identity_file, capsys, monkeypatch):
    identity_file.chmod(0o640)
    replaced = []
    real_replace = os.replace

    def spying_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spying_replace)
    assert run(capsys, "remove", "2")[0] == 0
    (src, dst), = replaced
    assert dst == identity_file and src.parent == identity_file.parent and not src.exists()
    assert identity_file.stat().st_mode & 0o777 == 0o640
    assert temp_files(identity_file.parent) == []


def test_failed_write_leaves_file_and_no_temp(identity_file, capsys, monkeypatch):
    before = identity_file.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        tool.main(["remove", "1"])
    assert identity_file.read_bytes() == before and temp_files(identity_file.parent) == []


def test_bad_line_numbers_and_invalid_lines(identity_file, capsys):
    code, _, err = run(capsys, "show", "9")
    assert code == 1 and "no conversation on line 9 (conversations are on lines 1 to 2" in err
    identity_file.write_bytes(identity_file.read_bytes() + b"{oops\n")
    code, out, _ = run(capsys, "list")
    assert code == 0 and "(invalid: invalid JSON" in out.splitlines()[3]
    code, _, err = run(capsys, "show", "3")
    assert code == 1 and f"{identity_file}:3: invalid JSON" in err
    # a broken line can still be removed
    assert run(capsys, "remove", "3")[0] == 0 and run(capsys, "validate")[0] == 0


def test_missing_file_points_at_prepare_and_add(base_dir, capsys):
    code, _, err = run(capsys, "list")
    assert code == 1 and "does not exist" in err and "prepare.sh" in err and "add" in err


def test_file_option_before_or_after_command_and_env_default(tmp_path, capsys, monkeypatch):
    path = write_input(tmp_path, jsonl(conversation("a", "b")), "identity_conversations.jsonl")
    monkeypatch.setenv("NANOCHAT_TASK_DATA", str(path.parent))
    assert run(capsys, "count")[1] == "1\n"
    monkeypatch.delenv("NANOCHAT_TASK_DATA")
    assert run(capsys, "--file", str(path), "count")[1] == "1\n"
    assert run(capsys, "count", "--file", str(path))[1] == "1\n"


def test_interactive_add_through_stdin(tmp_path, monkeypatch, capsys):
    path = tmp_path / "new" / "identity.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO("Who built you?\nA curious engineer.\nThanks!\nAnytime.\n\n"))
    code, _, err = run(capsys, "--file", str(path), "add", "--system", "You are nanochat.")
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert saved == conversation("Who built you?", "A curious engineer.", "Thanks!", "Anytime.", system="You are nanochat.")
    # ending input before any assistant reply is refused and creates nothing
    other = tmp_path / "other.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO("only a question\n"))
    code, _, err = run(capsys, "--file", str(other), "add")
    assert code == 1 and "refusing to add" in err and not other.exists()
