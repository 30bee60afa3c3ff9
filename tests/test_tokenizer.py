"""Tokenizer: training, files on disk, encoding, chat rendering, and the tok_train / tok_eval scripts.

`base_dir` (tests/conftest.py) gives every test its own $NANOCHAT_BASE_DIR.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import write_shard
from nanochat import fileio
from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    TokenizerError,
    default_tokenizer_dir,
    get_tokenizer,
)
from scripts import tok_eval, tok_train

VOCAB_SIZE = 512
NUM_MERGEABLE = VOCAB_SIZE - len(SPECIAL_TOKENS)
SYLLABLES = ["ka", "to", "ri", "en", "the", "ing", "qu", "an", "s", "mo", "la", "ver", "é", "ü", "日本", "語"]
UNICODE_SAMPLES = [
    "héllo wörld",
    "typed <|bos|> and <|assistant_end|>",
    "日本語のテキスト",
    "👩‍👩‍👧 family 🎉🎉",
    "tab\there\r\nnewline",
    "e\u0301 combining",
    "x" * 300,
]


def make_documents(seed: int, count: int) -> list[str]:
    """Made-up prose with digits and multi-byte characters, varied in length."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for _ in range(count):
        sentence_words = rng.choices(words, k=rng.randint(20, 400))
        # years recur so that a 3-digit merge would be learned if the regex allowed one
        sentence_words += ["2024", str(rng.randint(0, 99999)), "emoji 🎉", "can't", "I'll"]
        rng.shuffle(sentence_words)
        docs.append(" ".join(sentence_words) + ".\n")
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_from_iterator(make_documents(seed=1, count=200), VOCAB_SIZE)


def special(tok: Tokenizer, name: str) -> int:
    return tok.get_special_tokens()[name]


def concat(*pieces: tuple[list[int], int]) -> tuple[list[int], list[int]]:
    """Expected (ids, mask) from (ids, mask bit) pieces."""
    ids, mask = [], []
    for piece_ids, bit in pieces:
        ids += piece_ids
        mask += [bit] * len(piece_ids)
    return ids, mask


# ---------------------------------------------------------------- training


def test_training_gives_exact_vocab_with_specials_last_in_order(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert list(tok.get_special_tokens()) == list(SPECIAL_TOKENS)
    assert list(tok.get_special_tokens().values()) == list(range(NUM_MERGEABLE, VOCAB_SIZE))
    assert tok.get_bos_token_id() == NUM_MERGEABLE
    assert tok.encode_special("<|output_end|>") == VOCAB_SIZE - 1
    for doc in make_documents(seed=2, count=20):
        assert max(tok.encode(doc)) < NUM_MERGEABLE


def test_digits_are_split_in_groups_of_at_most_two(tok):
    assert tok.get_pattern() == SPLIT_PATTERN
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["20", "24"]
    assert all(len(tok.decode([i])) <= 2 for i in tok.encode("1234567890123"))


def test_training_rejects_vocab_below_bytes_plus_specials():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["some text"], 264)


def test_training_rejects_corpus_too_small_for_vocab():
    with pytest.raises(ValueError, match="fewer than vocab_size=4096"):
        Tokenizer.train_from_iterator(["tiny corpus, tiny corpus"], 4096)


def test_unknown_special_token_name_is_rejected(tok):
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|eos|>")


# ---------------------------------------------------------------- encoding


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
@example("👩‍👩‍👧 héllo 日本語 12345 \r\n\t  ")
def test_encode_decode_round_trips_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < NUM_MERGEABLE for i in ids)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=20)), max_size=8))
def test_text_spelling_special_tokens_never_yields_special_ids(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert all(i < NUM_MERGEABLE for i in ids)
    assert tok.decode(ids) == text


def test_prepend_and_append_take_names_or_ids(tok):
    body = tok.encode("hello world")
    bos, end = special(tok, "<|bos|>"), special(tok, "<|assistant_end|>")
    assert tok.encode("hello world", prepend="<|bos|>", append="<|assistant_end|>") == [bos] + body + [end]
    assert tok.encode("hello world", prepend=bos, append=7) == [bos] + body + [7]
    assert tok.encode(["a", "b"], prepend=bos) == [[bos] + tok.encode("a"), [bos] + tok.encode("b")]


@pytest.mark.parametrize("bad", ["<|nope|>", VOCAB_SIZE, -1])
def test_prepend_rejects_unknown_tokens(tok, bad):
    with pytest.raises(ValueError):
        tok.encode("x", prepend=bad)


@pytest.mark.parametrize("threads", [1, 4])
def test_batch_encode_equals_single_encodes(tok, threads):
    texts = make_documents(seed=3, count=10) + UNICODE_SAMPLES + [""]
    assert tok.encode(texts, num_threads=threads) == [tok.encode(t) for t in texts]
    assert tok.encode([]) == []


def test_token_bytes_sum_to_utf8_length(tok):
    lengths = tok.token_bytes()
    assert lengths.shape == (VOCAB_SIZE,)
    assert lengths[NUM_MERGEABLE:].tolist() == [0] * len(SPECIAL_TOKENS)
    assert lengths[:256].tolist() == [1] * 256
    for text in UNICODE_SAMPLES + make_documents(seed=4, count=5):
        ids = tok.encode(text, prepend="<|bos|>")
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


# ---------------------------------------------------------------- files


def test_save_load_gives_identical_tokenizer(tok, tmp_path):
    folder = tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(folder)
    texts = UNICODE_SAMPLES + make_documents(seed=5, count=5)
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.get_special_tokens() == tok.get_special_tokens()
    assert loaded.get_pattern() == tok.get_pattern()
    assert loaded.token_bytes().tolist() == tok.token_bytes().tolist()
    assert sorted(p.name for p in folder.iterdir()) == ["token_bytes.npy", "tokenizer.tiktoken", "tokenizer_meta.json"]
    assert np.load(folder / "token_bytes.npy", allow_pickle=False).dtype == np.int32


def test_get_tokenizer_reads_the_base_dir(tok, base_dir):
    with pytest.raises(TokenizerError):
        get_tokenizer()
    tok.save(default_tokenizer_dir())
    assert default_tokenizer_dir() == base_dir / "tokenizer"
    assert get_tokenizer().encode("abc 123") == tok.encode("abc 123")


def _rewrite_ranks_with_fresh_hash(folder: Path, edit) -> None:
    """Change tokenizer.tiktoken and re-pin it, to reach the parser behind the hash check."""
    ranks_path = folder / "tokenizer.tiktoken"
    ranks_path.write_text(edit(ranks_path.read_text()))
    manifest = json.loads((folder / "tokenizer_meta.json").read_text())
    manifest["sha256"]["tokenizer.tiktoken"] = hashlib.sha256(ranks_path.read_bytes()).hexdigest()
    (folder / "tokenizer_meta.json").write_text(json.dumps(manifest))


def _edit_manifest(folder: Path, key: str, value) -> None:
    manifest = json.loads((folder / "tokenizer_meta.json").read_text())
    manifest[key] = value
    (folder / "tokenizer_meta.json").write_text(json.dumps(manifest))


CORRUPTIONS = {
    "folder missing": shutil.rmtree,
    "manifest missing": lambda f: (f / "tokenizer_meta.json").unlink(),
    "manifest not json": lambda f: (f / "tokenizer_meta.json").write_text('{"format": "nanochat-tok'),
    "manifest wrong format": lambda f: _edit_manifest(f, "format", "something-else"),
    "specials renamed": lambda f: _edit_manifest(f, "special_tokens", {"<|eos|>": NUM_MERGEABLE}),
    "token_bytes missing": lambda f: (f / "token_bytes.npy").unlink(),
    "ranks truncated": lambda f: (f / "tokenizer.tiktoken").write_text((f / "tokenizer.tiktoken").read_text()[:-200]),
    "ranks line garbled": lambda f: _rewrite_ranks_with_fresh_hash(
        f, lambda t: t.replace(" 300\n", " three hundred\n")
    ),
    "ranks line dropped": lambda f: _rewrite_ranks_with_fresh_hash(f, lambda t: re.sub(r"(?m)^\S+ 100\n", "", t)),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_loading_a_broken_folder_names_it_and_says_how_to_fix(tok, tmp_path, corruption):
    folder = tok.save(tmp_path / "tok")
    CORRUPTIONS[corruption](folder)
    with pytest.raises(TokenizerError) as info:
        Tokenizer.load(folder)
    assert str(folder) in str(info.value)
    assert "python -m scripts.tok_train" in str(info.value)


def test_interrupted_save_is_refused_not_mixed(tok, tmp_path, monkeypatch):
    folder = tok.save(tmp_path / "tok")
    other = Tokenizer.train_from_iterator(make_documents(seed=9, count=100), VOCAB_SIZE + 8)
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # killed after the first file of the new tokenizer landed
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(fileio.os, "replace", replace_then_die)
        other.save(folder)
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(TokenizerError, match="interrupted save"):
        Tokenizer.load(folder)


# ---------------------------------------------------------------- chat rendering


def test_render_single_turn(tok):
    conversation = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    ids, mask = tok.render_conversation(conversation)
    expected = concat(
        ([special(tok, "<|bos|>"), special(tok, "<|user_start|>")], 0),
        (tok.encode("Hi there"), 0),
        ([special(tok, "<|user_end|>"), special(tok, "<|assistant_start|>")], 0),
        (tok.encode("Hello!"), 1),
        ([special(tok, "<|assistant_end|>")], 1),
    )
    assert (ids, mask) == expected
    assert tok.decode(ids) == "<|bos|><|user_start|>Hi there<|user_end|><|assistant_start|>Hello!<|assistant_end|>"


def test_render_multi_turn_bare_list(tok):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ids, mask = tok.render_conversation(messages)
    turn = lambda user, reply: [  # noqa: E731
        ([special(tok, "<|user_start|>")] + tok.encode(user) + [special(tok, "<|user_end|>")], 0),
        ([special(tok, "<|assistant_start|>")], 0),
        (tok.encode(reply) + [special(tok, "<|assistant_end|>")], 1),
    ]
    assert (ids, mask) == concat(([tok.get_bos_token_id()], 0), *turn("2+2?", "4"), *turn("and 3+3?", "6"))


def test_render_folds_system_message_into_first_user_turn(tok):
    conversation = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hey"},
        ]
    }
    before = copy.deepcopy(conversation)
    ids, mask = tok.render_conversation(conversation)
    expected = concat(
        ([tok.get_bos_token_id(), special(tok, "<|user_start|>")], 0),
        (tok.encode("Be terse.\n\nHi"), 0),
        ([special(tok, "<|user_end|>"), special(tok, "<|assistant_start|>")], 0),
        (tok.encode("Hey") + [special(tok, "<|assistant_end|>")], 1),
    )
    assert (ids, mask) == expected
    assert conversation == before


def test_render_tool_use_trains_calls_not_outputs(tok):
    parts = [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "print(6*7)"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "It is 42."},
    ]
    ids, mask = tok.render_conversation([{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": parts}])
    expected = concat(
        ([tok.get_bos_token_id(), special(tok, "<|user_start|>")] + tok.encode("6*7?"), 0),
        ([special(tok, "<|user_end|>"), special(tok, "<|assistant_start|>")], 0),
        (tok.encode("Let me compute."), 1),
        ([special(tok, "<|python_start|>")] + tok.encode("print(6*7)") + [special(tok, "<|python_end|>")], 1),
        ([special(tok, "<|output_start|>")] + tok.encode("42") + [special(tok, "<|output_end|>")], 0),
        (tok.encode("It is 42.") + [special(tok, "<|assistant_end|>")], 1),
    )
    assert (ids, mask) == expected


MALFORMED = {
    "empty list": [],
    "empty messages": {"messages": []},
    "not a conversation": "hello",
    "starts with assistant": [{"role": "assistant", "content": "hi"}],
    "two users in a row": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "two assistants in a row": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"},
    ],
    "system not first": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": "c"},
        {"role": "user", "content": "d"},
    ],
    "system alone": [{"role": "system", "content": "a"}],
    "unknown role": [{"role": "tool", "content": "a"}],
    "missing content": [{"role": "user"}],
    "user content not a string": [{"role": "user", "content": None}],
    "unknown part type": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "image", "text": "x"}]},
    ],
    "part without text": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}],
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_conversations_raise_value_error(tok, case):
    with pytest.raises(ValueError):
        tok.render_conversation(MALFORMED[case])
    with pytest.raises(ValueError):
        tok.render_for_completion(MALFORMED[case])


def test_render_truncates_ids_and_mask_together(tok):
    conversation = [
        {"role": "user", "content": "a fairly long question"},
        {"role": "assistant", "content": "a fairly long answer"},
    ]
    full_ids, full_mask = tok.render_conversation(conversation)
    ids, mask = tok.render_conversation(conversation, max_tokens=7)
    assert len(full_ids) > 7
    assert (ids, mask) == (full_ids[:7], full_mask[:7])


def test_render_for_completion_drops_trailing_answer_and_opens_assistant_turn(tok):
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    prompt = tok.render_for_completion({"messages": messages})
    assistant_start = special(tok, "<|assistant_start|>")
    assert prompt[-1] == assistant_start
    assert prompt == tok.render_conversation(messages[:-1])[0] + [assistant_start]
    assert tok.render_for_completion(messages[:-1]) == prompt
    full_ids, _ = tok.render_conversation(messages, max_tokens=10_000)
    assert full_ids[: len(prompt)] == prompt
    assert tok.decode(full_ids[len(prompt) :]) == "4<|assistant_end|>"


# ---------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two parquet shards: shard_00000 is train, shard_00001 (the last) is validation."""
    folder = tmp_path_factory.mktemp("shards")
    for index, docs in enumerate([make_documents(seed=10, count=150), make_documents(seed=11, count=40)]):
        pq.write_table(pa.table({"text": docs}), folder / f"shard_{index:05d}.parquet")
    return folder


def run_main(capsys, script, *args: str) -> tuple[int, str, str]:
    """script.main(args) in this process (no interpreter start-up): exit code, stdout, stderr."""
    code = script.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tok_train_then_tok_eval(shards, base_dir, capsys):
    code, out, err = run_main(capsys, tok_train, "--vocab-size", "512", "--max-chars", "1e5", "--data-dir", str(shards))
    assert code == 0, err
    assert "trained on 100,000 characters" in out
    assert str(base_dir / "tokenizer") in out
    assert Tokenizer.load(base_dir / "tokenizer").get_vocab_size() == 512

    code, out, err = run_main(capsys, tok_eval, "--max-docs", "25", "--data-dir", str(shards))
    assert code == 0, err
    val_docs = make_documents(seed=11, count=40)[:25]
    assert f"validation documents: 25 ({sum(map(len, val_docs)):,} characters" in out
    assert re.search(r"^ours\s+512\s", out, re.MULTILINE)


def test_tok_train_caps_each_document(shards, base_dir, capsys):
    code, out, err = run_main(capsys, tok_train, "--vocab-size", "300", "--doc-cap", "500", "--data-dir", str(shards))
    assert code == 0, err
    capped_total = sum(min(len(doc), 500) for doc in make_documents(seed=10, count=150))
    assert f"trained on {capped_total:,} characters" in out


def test_tok_eval_without_tokenizer_fails_clearly(shards, capsys):
    code, _, err = run_main(capsys, tok_eval, "--data-dir", str(shards))
    assert code != 0
    assert "python -m scripts.tok_train" in err


def test_tok_train_without_data_fails_clearly(tmp_path, capsys):
    code, _, err = run_main(capsys, tok_train, "--vocab-size", "300", "--data-dir", str(tmp_path / "empty"))
    assert code != 0
    assert str(tmp_path / "empty") in err


def test_tok_train_learns_from_the_chosen_dataset_and_again_when_the_choice_changes(base_dir, capsys):
    """prepare.sh --dataset climbmix then ./prepare.sh --dataset fineweb-edu: each trains on its own shards;
    the same dataset again keeps the tokenizer, and so does a tokenizer from before records, on base_data."""
    from nanochat.shards import choose_folder

    # each dataset's own word, of letters the made-up prose never uses: one token, or one per byte (7 with the space)
    for folder, word in (("base_data", "dfcxwz"), ("base_data_climbmix", "zybjpw")):
        for index in (0, 1):
            docs = [f"{word} " * 20 + doc for doc in make_documents(seed=index, count=30)]
            write_shard(base_dir / folder / f"shard_{index:05d}.parquet", docs)
    train = ["--vocab-size", "300", "--skip-if-trained"]

    def tokens_of(word: str) -> int:
        return len(Tokenizer.load(base_dir / "tokenizer").encode(" " + word))

    choose_folder("base_data_climbmix")
    code, out, err = run_main(capsys, tok_train, *train)
    assert code == 0, err
    assert "characters of base_data_climbmix" in out and tokens_of("zybjpw") == 1 and tokens_of("dfcxwz") == 7
    code, out, _ = run_main(capsys, tok_train, *train)
    assert code == 0 and "already trained on base_data_climbmix" in out and "trained on 1" not in out

    choose_folder("base_data")
    code, out, _ = run_main(capsys, tok_train, *train)
    assert code == 0 and "was trained on base_data_climbmix: training it again on base_data" in out
    assert tokens_of("dfcxwz") == 1 and tokens_of("zybjpw") == 7

    (base_dir / "tokenizer" / tok_train.RECORD_FILE).unlink()  # as trained before this record existed
    code, out, _ = run_main(capsys, tok_train, *train)
    assert code == 0 and "already trained on base_data" in out


def byte_level_encoding(name: str) -> tiktoken.Encoding:
    """Stands in for a downloaded baseline: one token per byte, so exactly 1.000 bytes/token."""
    return tiktoken.Encoding(
        name=name, pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}
    )


def test_tok_eval_compares_with_baselines_that_load(tok, shards, monkeypatch, capsys):
    tok.save(default_tokenizer_dir())
    monkeypatch.setattr(tok_eval.tiktoken, "get_encoding", byte_level_encoding)
    assert tok_eval.main(["--max-docs", "5", "--data-dir", str(shards)]) == 0
    out = capsys.readouterr().out
    num_bytes = re.search(r"characters, ([\d,]+) bytes\)", out).group(1)
    for row_name in (r"gpt2 \(GPT-2\)", r"cl100k_base \(GPT-4\)"):
        # one token per byte: as many tokens as bytes, and more tokens than ours
        assert re.search(rf"^{row_name}\s+256\s+{num_bytes}\s+1\.000\s+\S+\s+\+", out, re.MULTILINE)


def test_tok_eval_skips_baselines_it_cannot_fetch(tok, shards, monkeypatch, capsys):
    def offline(name):
        raise ConnectionError(f"cannot fetch {name}")

    tok.save(default_tokenizer_dir())
    monkeypatch.setattr(tok_eval.tiktoken, "get_encoding", offline)
    assert tok_eval.main(["--max-docs", "5", "--data-dir", str(shards)]) == 0
    out = capsys.readouterr().out
    assert "gpt2 (GPT-2): unavailable offline" in out
    assert "cl100k_base (GPT-4): unavailable offline" in out
    assert re.search(r"^ours\s+512\s", out, re.MULTILINE)
