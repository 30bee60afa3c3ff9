"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken.

The split regex is GPT-4's except that digits are grouped 1-2 at a time
instead of 1-3: a small vocabulary spends fewer slots on 3-digit numbers.
Nine special tokens sit at the very end of the id space, after every
mergeable (byte-sequence) token.

On disk, in one folder (see `save`), with nothing that needs pickle to load:
  tokenizer.tiktoken  one "base64(token bytes) rank" line per mergeable token
  token_bytes.npy     int32 [vocab_size]: UTF-8 byte length per id, 0 for specials
  tokenizer_meta.json split pattern, special tokens and ids, sha256 of the two files
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken
import torch

from nanochat.common import get_base_dir
from nanochat.conversation import BOS, PART_TOKENS, SPECIAL_TOKENS, TURN_TOKENS, fold_system, messages_of, structure_problem
from nanochat.fileio import atomic_write

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


RANKS_FILE = "tokenizer.tiktoken"
TOKEN_BYTES_FILE = "token_bytes.npy"
MANIFEST_FILE = "tokenizer_meta.json"
FORMAT_NAME = "nanochat-tokenizer"
FORMAT_VERSION = 1
NUM_BYTE_TOKENS = 256

TRAIN_HINT = "Train one with `python -m scripts.tok_train` (or run ./prepare.sh)."


class TokenizerError(RuntimeError):
    """A tokenizer folder is missing, incomplete or corrupt, or token ranks are unusable."""


def default_tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def get_tokenizer() -> Tokenizer:
    """The tokenizer saved under $NANOCHAT_BASE_DIR/tokenizer."""
    return Tokenizer.load(default_tokenizer_dir())


class Tokenizer:
    """A tiktoken encoding plus the chat rendering the rest of the pipeline relies on."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        _check_ranks(mergeable_ranks)
        num_mergeable = len(mergeable_ranks)
        self._special_ids = {name: num_mergeable + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            name="nanochat",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self._special_ids,
        )
        self._ranks = mergeable_ranks
        self._pattern = pattern
        self._token_bytes = _byte_lengths(mergeable_ranks, len(SPECIAL_TOKENS))

    # ------------------------------------------------------------ training and files

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn merges so that mergeable tokens plus the specials total exactly `vocab_size`."""
        num_mergeable = vocab_size - len(SPECIAL_TOKENS)
        if num_mergeable < NUM_BYTE_TOKENS:
            minimum = NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)
            raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + 9 specials), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), num_mergeable, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        # rustbpe stops early when no pair occurs twice; a smaller vocab than asked
        # for would silently change every model shape downstream.
        if len(ranks) != num_mergeable:
            raise ValueError(
                f"the training text supports only {len(ranks) + len(SPECIAL_TOKENS)} tokens, "
                f"fewer than vocab_size={vocab_size}; train on more text or lower the vocab size"
            )
        return cls(ranks, SPLIT_PATTERN)

    def save(self, directory: str | Path) -> Path:
        """Write the three files; the manifest goes last and pins the others by hash.

        Each file is replaced atomically. If a save is killed between files, the old
        manifest's hashes no longer match and `load` refuses the folder instead of
        returning a tokenizer stitched from two trainings.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks_blob = _ranks_to_text(self._ranks).encode("ascii")
        token_bytes_blob = _npy_bytes(self._token_bytes)
        atomic_write(directory / RANKS_FILE, ranks_blob)
        atomic_write(directory / TOKEN_BYTES_FILE, token_bytes_blob)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "vocab_size": self.get_vocab_size(),
            "pattern": self._pattern,
            "special_tokens": self._special_ids,
            "sha256": {RANKS_FILE: _sha256(ranks_blob), TOKEN_BYTES_FILE: _sha256(token_bytes_blob)},
        }
        atomic_write(directory / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a folder written by `save`; raise TokenizerError naming the folder if unusable."""
        directory = Path(directory)
        try:
            return cls._load_checked(directory)
        except (TokenizerError, OSError, ValueError) as err:  # ValueError: e.g. a split pattern that does not compile
            raise TokenizerError(f"no usable tokenizer in {directory}: {err}. {TRAIN_HINT}") from err

    @classmethod
    def _load_checked(cls, directory: Path) -> Tokenizer:
        if not directory.is_dir():
            raise TokenizerError("the folder does not exist")
        manifest = _read_manifest(directory / MANIFEST_FILE)
        ranks_blob = _read_pinned(directory, RANKS_FILE, manifest)
        token_bytes_blob = _read_pinned(directory, TOKEN_BYTES_FILE, manifest)
        tokenizer = cls(_ranks_from_text(ranks_blob), manifest["pattern"])
        if tokenizer.get_vocab_size() != manifest["vocab_size"]:
            raise TokenizerError(
                f"{MANIFEST_FILE} says vocab_size {manifest['vocab_size']}, files hold {tokenizer.get_vocab_size()}"
            )
        if manifest["special_tokens"] != tokenizer._special_ids:
            raise TokenizerError(f"{MANIFEST_FILE} lists special tokens other than the expected nine at the end")
        saved_lengths = np.load(io.BytesIO(token_bytes_blob), allow_pickle=False)
        if not np.array_equal(saved_lengths, tokenizer._token_bytes):
            raise TokenizerError(f"{TOKEN_BYTES_FILE} disagrees with {RANKS_FILE}")
        return tokenizer

    # ------------------------------------------------------------ encoding

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]] (encoded in parallel).

        Text is always ordinary text: "<|bos|>" typed by a user becomes byte tokens,
        never the special id. `prepend` / `append` take a special token name or an id.
        """
        before = [] if prepend is None else [self._as_id(prepend)]
        after = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return before + self._enc.encode_ordinary(text) + after
        if isinstance(text, (list, tuple)):
            rows = self._enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [before + row + after for row in rows]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: Sequence[int]) -> str:
        # int() accepts numpy and 0-d torch scalars, which tiktoken does not
        return self._enc.decode([int(i) for i in ids])

    def bytes_of(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's name for a special)."""
        return self._enc.decode_single_token_bytes(int(token_id))

    def encode_special(self, name: str) -> int:
        if name not in self._special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[name]

    def get_bos_token_id(self) -> int:
        return self._special_ids[BOS]

    def get_vocab_size(self) -> int:
        return self._enc.n_vocab

    def get_special_tokens(self) -> dict[str, int]:
        """Special token names to ids, in id order."""
        return dict(self._special_ids)

    def get_pattern(self) -> str:
        return self._pattern

    def get_mergeable_ranks(self) -> dict[bytes, int]:
        """Token bytes -> id for every non-special token (a copy; exporters rebuild merges from it)."""
        return dict(self._ranks)

    def token_bytes(self) -> torch.Tensor:
        """int32 [vocab_size]: UTF-8 bytes each id stands for (0 for specials), for bits-per-byte."""
        return torch.from_numpy(self._token_bytes.copy())

    def _as_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
            if 0 <= token < self.get_vocab_size():
                return int(token)
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.get_vocab_size()})")
        raise TypeError(f"expected a special token name or an int id, got {token!r}")

    # ------------------------------------------------------------ chat rendering

    def render_conversation(self, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and a same-length 0/1 mask: 1 where the model is trained to predict the token.

        `conversation` is {"messages": [...]} or a list of OpenAI-style messages. A
        leading system message is folded into the first user message.
        """
        ids, mask = self._render(_chat_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Ids that prompt the model to answer the last user turn.

        A trailing assistant turn (a reference answer in eval/RL data) is dropped.
        """
        messages = _chat_messages(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        return ids + [self._special_ids[TURN_TOKENS["assistant"][0]]]

    def _render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        ids, mask = [self.get_bos_token_id()], [0]
        for message in messages:
            pieces = self._user_pieces(message["content"]) if message["role"] == "user" else self._assistant_pieces(message["content"])
            for piece_ids, trained in pieces:
                ids += piece_ids
                mask += [trained] * len(piece_ids)
        return ids, mask

    def _user_pieces(self, content: str) -> list[tuple[list[int], int]]:
        start, end = (self._special_ids[name] for name in TURN_TOKENS["user"])
        return [([start], 0), (self.encode(content), 0), ([end], 0)]

    def _assistant_pieces(self, content) -> list[tuple[list[int], int]]:
        start, end = (self._special_ids[name] for name in TURN_TOKENS["assistant"])
        pieces = [([start], 0)]
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            opening, closing, trained = PART_TOKENS[part["type"]]
            body = self.encode(part["text"])
            if opening is not None:
                body = [self._special_ids[opening], *body, self._special_ids[closing]]
            pieces.append((body, int(trained)))
        pieces.append(([end], 1))  # the model learns to end its answer
        return pieces


def _chat_messages(conversation) -> list[dict]:
    """Validated messages, system folded into the first user turn; the input is not modified."""
    problem = structure_problem(conversation)
    if problem:
        raise ValueError(problem)
    return fold_system(list(messages_of(conversation)))


# ---------------------------------------------------------------- file format helpers


def _check_ranks(ranks: dict[bytes, int]) -> None:
    """tiktoken needs ids 0..n-1 and every single byte, or encoding some text would fail."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError("mergeable token ranks are not exactly 0..n-1")
    missing = [b for b in range(NUM_BYTE_TOKENS) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{len(missing)} of the 256 single-byte tokens are missing")


def _byte_lengths(ranks: dict[bytes, int], num_special: int) -> np.ndarray:
    lengths = np.zeros(len(ranks) + num_special, dtype=np.int32)
    for token, rank in ranks.items():
        lengths[rank] = len(token)
    return lengths


def _ranks_to_text(ranks: dict[bytes, int]) -> str:
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ordered)


def _ranks_from_text(blob: bytes) -> dict[bytes, int]:
    ranks = {}
    for line_number, line in enumerate(blob.decode("ascii").splitlines(), start=1):
        try:
            encoded, rank = line.split(" ")
            ranks[base64.b64decode(encoded, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{RANKS_FILE} line {line_number} is not 'base64 rank': {line[:80]!r}") from None
    return ranks


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise TokenizerError(f"{path.name} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path.name} is not valid JSON ({err})") from None
    fields = {"format": str, "version": int, "vocab_size": int, "pattern": str, "special_tokens": dict, "sha256": dict}
    if not isinstance(manifest, dict) or any(not isinstance(manifest.get(k), t) for k, t in fields.items()):
        raise TokenizerError(f"{path.name} lacks the fields {', '.join(fields)}")
    if (manifest["format"], manifest["version"]) != (FORMAT_NAME, FORMAT_VERSION):
        found = f"{manifest['format']!r} v{manifest['version']}"
        raise TokenizerError(f"{path.name} is format {found}, expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
    return manifest


def _read_pinned(directory: Path, name: str, manifest: dict) -> bytes:
    """A file's bytes, provided they hash to what the manifest recorded."""
    path = directory / name
    if not path.is_file():
        raise TokenizerError(f"{name} is missing")
    blob = path.read_bytes()
    if _sha256(blob) != manifest["sha256"].get(name):
        raise TokenizerError(f"{name} does not match the hash in {MANIFEST_FILE} (corrupt, or an interrupted save)")
    return blob


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
