"""Browse, check and edit the identity conversations that teach the model who it is.

    python view_identity_data.py list                 # line, turns, first user message
    python view_identity_data.py show 3               # the conversation on line 3
    python view_identity_data.py search "who made"    # case-insensitive, over every message
    python view_identity_data.py add                  # type a conversation, turn by turn
    python view_identity_data.py add --from new.jsonl # append conversations from a file
    python view_identity_data.py remove 3
    python view_identity_data.py validate             # every problem, with its line number
    python view_identity_data.py count

The file (--file; default identity_conversations.jsonl in $NANOCHAT_TASK_DATA if there,
else in $NANOCHAT_BASE_DIR: the file midtraining and SFT read)
holds one JSON object per line: {"messages": [{"role": "user", "content": "..."}, ...]}.
Conversations are numbered by their line in the file, the number an editor shows.
Edits rewrite the file atomically and leave every other line byte-for-byte as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanochat.conversation import shown_text
from nanochat.fileio import atomic_write
from nanochat.flags import FlagParser
from tasks.identity import default_identity_path, validate_conversation

PREVIEW_CHARS = 60


class ToolError(Exception):
    """A problem to report to the user as one message, exiting 1."""


# The rules live with the task that trains on this file, so the tool and training never disagree:
# an optional system message, then user/assistant alternating from the user, at least one of each,
# non-empty contents (an assistant content may also be a list of text/python/python_output parts).
problem_with = validate_conversation


def problem_with_object(conversation) -> str | None:
    """What is wrong with one decoded JSON value as a conversation, or None."""
    if not isinstance(conversation, dict):
        return f"expected a JSON object, got {type(conversation).__name__}"
    if "messages" not in conversation:
        return 'missing the "messages" list'
    return problem_with(conversation["messages"])


def parse_conversation(text: str) -> tuple[dict | None, str | None]:
    """A line's conversation object and None, or None and what is wrong with the line."""
    try:
        conversation = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    problem = problem_with_object(conversation)
    return (None, problem) if problem else (conversation, None)


def split_lines(data: bytes) -> list[bytes]:
    """The file's lines with their endings; joined they give back `data` exactly.

    Only b"\\n" ends a line, as in JSONL, so a stray \\r stays inside its line.
    """
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def decode_line(raw: bytes, number: int) -> tuple[str | None, str | None]:
    """A line's text (BOM and line ending dropped) or the reason it cannot be decoded."""
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start + 1})"
    return text.rstrip("\r\n"), None


class ConversationFile:
    """The JSONL file as raw lines, so edits can leave the others untouched."""

    def __init__(self, path: Path, lines: list[bytes]):
        self.path = path
        self.lines = lines

    @classmethod
    def load(cls, path: Path, missing_ok: bool = False) -> "ConversationFile":
        if not path.exists():
            if missing_ok:
                return cls(path, [])
            raise ToolError(
                f"{path} does not exist: ./prepare.sh downloads the identity conversations, "
                f"or `python view_identity_data.py add` starts a new file"
            )
        try:
            return cls(path, split_lines(path.read_bytes()))
        except OSError as exc:
            raise ToolError(f"cannot read {path}: {exc}") from exc

    def entries(self):
        """(line number, conversation or None, problem or None) for every non-blank line."""
        for number, raw in enumerate(self.lines, start=1):
            text, problem = decode_line(raw, number)
            if text is not None and not text.strip():
                continue
            if problem is None:
                conversation, problem = parse_conversation(text)
            else:
                conversation = None
            yield number, conversation, problem

    def entry_on_line(self, number: int) -> tuple[dict | None, str | None]:
        """(conversation, problem) on line `number`; ToolError says where conversations are when none is there."""
        entries = {n: (conversation, problem) for n, conversation, problem in self.entries()}
        if number not in entries:
            span = f"lines {min(entries)} to {max(entries)}" if entries else "no line: the file is empty"
            raise ToolError(f"{self.path}: no conversation on line {number} (conversations are on {span}; see `list`)")
        return entries[number]

    def save(self) -> None:
        atomic_write(self.path, b"".join(self.lines))


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def first_user_message(conversation: dict) -> str:
    return next((m["content"] for m in conversation["messages"] if m["role"] == "user"), "")


def count_turns(conversation: dict) -> int:
    return sum(1 for m in conversation["messages"] if m["role"] != "system")


def cmd_list(args) -> int:
    listing = ConversationFile.load(args.file)
    print(f"{'line':>5}  {'turns':>5}  first user message")
    for number, conversation, problem in listing.entries():
        if conversation is None:
            print(f"{number:>5}  {'-':>5}  (invalid: {problem})")
        else:
            print(f"{number:>5}  {count_turns(conversation):>5}  {preview(first_user_message(conversation))}")
    return 0


def cmd_show(args) -> int:
    conversation, problem = ConversationFile.load(args.file).entry_on_line(args.line)
    if conversation is None:
        raise ToolError(f"{args.file}:{args.line}: {problem}")
    print(f"line {args.line}, {count_turns(conversation)} turns")
    for message in conversation["messages"]:
        print(f"\n[{message['role']}]\n{shown_text(message['content'])}")
    return 0


def cmd_search(args) -> int:
    needle = args.text.casefold()
    hits = 0
    for number, conversation, _ in ConversationFile.load(args.file).entries():
        if conversation is None:
            continue
        for message in conversation["messages"]:
            text = shown_text(message["content"])
            at = text.casefold().find(needle)
            if at < 0:
                continue
            hits += 1
            # start the snippet a little before the match, so the match itself is visible
            start = max(0, at - PREVIEW_CHARS // 3)
            snippet = ("..." if start else "") + text[start:]
            print(f"{number:>5}  {message['role']:<9}  {preview(snippet)}")
            break
    if not hits:
        print(f"no conversation mentions {args.text!r}", file=sys.stderr)
        return 1
    return 0


def read_turns_interactively(system: str | None) -> list[dict]:
    """Alternate user/assistant prompts until an empty line or end of input."""
    print("Type one turn per line, starting with the user; an empty line (or Ctrl-D) ends the conversation.")
    messages = [{"role": "system", "content": system}] if system else []
    role = "user"
    while True:
        try:
            content = input(f"{role}> ")
        except EOFError:
            print()
            break
        if not content.strip():
            break
        messages.append({"role": role, "content": content})
        role = "assistant" if role == "user" else "user"
    return messages


def read_conversations_from(path: Path) -> list[dict]:
    """Conversations from a JSON file (one object, or a list of them) or a JSONL file; ToolError lists every problem."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolError(f"cannot read {path}: {exc}") from exc
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        # not one JSON document, so JSONL: judge each line on its own
        parsed = [(f"{path}:{n}", *parse_conversation(line)) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    else:
        items = whole if isinstance(whole, list) else [whole]
        parsed = [(f"{path} (item {i})", item, problem_with_object(item)) for i, item in enumerate(items, start=1)]
    conversations = [conversation for _, conversation, problem in parsed if not problem]
    problems = [f"{where}: {problem}" for where, _, problem in parsed if problem]
    if problems:
        raise ToolError("refusing to add anything:\n  " + "\n  ".join(problems))
    if not conversations:
        raise ToolError(f"{path} holds no conversations")
    return conversations


def cmd_add(args) -> int:
    if args.from_file is not None:
        conversations = read_conversations_from(args.from_file)
    else:
        messages = read_turns_interactively(args.system)
        if not any(m["role"] == "user" for m in messages):
            raise ToolError(f"nothing typed, nothing added; {args.file} is unchanged")
        problem = problem_with(messages)
        if problem:
            raise ToolError(f"refusing to add this conversation: {problem}; {args.file} is unchanged")
        conversations = [{"messages": messages}]
    listing = ConversationFile.load(args.file, missing_ok=True)
    if listing.lines and not listing.lines[-1].endswith(b"\n"):
        listing.lines[-1] += b"\n"  # the last line had no newline; the new ones must not join it
    first_new = len(listing.lines) + 1
    listing.lines += [json.dumps(c, ensure_ascii=False).encode("utf-8") + b"\n" for c in conversations]
    args.file.parent.mkdir(parents=True, exist_ok=True)
    listing.save()
    span = f"line {first_new}" if len(conversations) == 1 else f"lines {first_new}-{first_new + len(conversations) - 1}"
    print(f"added {len(conversations)} conversation(s) to {args.file} ({span})")
    return 0


def cmd_remove(args) -> int:
    listing = ConversationFile.load(args.file)
    conversation, _ = listing.entry_on_line(args.line)
    removed = listing.lines.pop(args.line - 1)
    listing.save()
    what = first_user_message(conversation) if conversation else removed.decode("utf-8", errors="replace")
    print(f"removed line {args.line} from {args.file}: {preview(what)}")
    return 0


def cmd_validate(args) -> int:
    total = problems = 0
    for number, _, problem in ConversationFile.load(args.file).entries():
        total += 1
        if problem:
            problems += 1
            print(f"{args.file}:{number}: {problem}")
    if problems:
        print(f"{problems} of {total} conversations have problems", file=sys.stderr)
        return 1
    print(f"all {total} conversations are valid")
    return 0


def cmd_count(args) -> int:
    print(sum(1 for _ in ConversationFile.load(args.file).entries()))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = FlagParser(
        prog="view_identity_data.py",
        description="Browse, check and edit the identity conversations (JSONL, one conversation per line).",
    )
    file_help = "conversations file (default: identity_conversations.jsonl in $NANOCHAT_TASK_DATA if there, else in $NANOCHAT_BASE_DIR)"
    parser.add_argument("--file", type=Path, default=None, help=file_help)
    # --file is also accepted after the command; SUPPRESS keeps a subcommand from resetting it to None
    file_option = FlagParser(add_help=False)
    file_option.add_argument("--file", type=Path, default=argparse.SUPPRESS, help=file_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[file_option], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    command("list", cmd_list, "one row per conversation: line number, turns, first user message")
    command("show", cmd_show, "print one conversation").add_argument("line", type=int, help="its line number, as `list` prints it")
    command("search", cmd_search, "conversations mentioning TEXT (case-insensitive; exit 1 if none)").add_argument("text", help="text to look for in every message")
    add = command("add", cmd_add, "append a conversation typed turn by turn, or conversations from a file")
    add.add_argument("--from", dest="from_file", type=Path, default=None, metavar="FILE", help="JSONL file, or JSON file with one conversation or a list of them")
    add.add_argument("--system", default=None, metavar="TEXT", help="start the typed conversation with this system message")
    command("remove", cmd_remove, "delete one conversation").add_argument("line", type=int, help="its line number, as `list` prints it")
    command("validate", cmd_validate, "check every line; print each problem with its line number (exit 1 if any)")
    command("count", cmd_count, "print the number of conversations")
    args = parser.parse_args(argv)
    if args.file is None:
        args.file = default_identity_path()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.handler(args)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; {args.file} is unchanged", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
