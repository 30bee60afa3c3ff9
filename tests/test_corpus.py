"""Importing your own corpus: txt / jsonl / parquet into pretraining shards."""

from __future__ import annotations

import json

import pytest

from conftest import write_shard
from nanochat import dataset
from nanochat.corpus import CorpusError, import_corpus, split_document
from nanochat.dataset import iter_documents, list_shards


def _fill(folder):
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("A first text file.\n\nWith two paragraphs.", encoding="utf-8")
    (folder / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": f"jsonl doc {i} ✓"}) for i in range(30)) + "\n\n")
    write_shard(folder / "c.parquet", [f"parquet doc {i}" for i in range(40)], rows_per_group=16)
    (folder / "ignored.csv").write_text("not,text\n")


def test_import_keeps_every_document_and_puts_validation_last(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _fill(src)
    stats = import_corpus(src, out, val_fraction=0.1, shard_chars=300)
    train, val = list(iter_documents("train", out)), list(iter_documents("val", out))
    expected = ["A first text file.\n\nWith two paragraphs."] + [f"jsonl doc {i} ✓" for i in range(30)] + [f"parquet doc {i}" for i in range(40)]
    assert sorted(train + val) == sorted(expected)
    assert len(val) == stats.val_docs == 8 and stats.train_docs == 63
    assert stats.train_shards == len(list_shards(out)) - 1 > 1  # small shard_chars forces several shards
    assert not list(out.glob(".import-*"))


def test_long_documents_are_split_at_paragraphs():
    paragraphs = [f"paragraph {i} " + "word " * 40 for i in range(30)]
    text = "\n\n".join(paragraphs)
    pieces = split_document(text, max_chars=500)
    assert all(len(p) <= 500 for p in pieces) and len(pieces) > 1
    assert "\n\n".join(pieces).split() == text.split()
    assert all(p.startswith("paragraph") for p in pieces)
    assert split_document("x" * 250, max_chars=100) == ["x" * 100, "x" * 100, "x" * 50]


def test_malformed_jsonl_names_file_and_line_and_writes_nothing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2"):
        import_corpus(src, out)
    assert list_shards(out) == {}
    (src / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        import_corpus(src, out)


def test_existing_shards_need_overwrite(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _fill(src)
    import_corpus(src, out, val_fraction=0.5)
    with pytest.raises(CorpusError, match="--overwrite"):
        import_corpus(src, out)
    (src / "a.txt").unlink()
    import_corpus(src, out, overwrite=True, val_fraction=0.5)
    assert not any("A first text file" in d for d in iter_documents("train", out))


def test_bad_sources(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        import_corpus(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt"):
        import_corpus(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(CorpusError, match="too few"):
        import_corpus(tmp_path / "one.txt", tmp_path / "out")


def test_cli_import_and_error_exit_code(tmp_path, capsys):
    src = tmp_path / "src"
    _fill(src)
    assert dataset.main(["--from", str(src), "--data-dir", str(tmp_path / "out")]) == 0
    assert dataset.main(["--from", str(src), "--data-dir", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_an_import_after_a_climbmix_download_is_what_the_readers_use(tmp_path, base_dir, capsys):
    """prepare.sh --from after prepare.sh --dataset climbmix: the import lands in base_data and the readers
    turn to it; run again (--keep-existing, as prepare.sh does) it keeps the shards and still points there."""
    write_shard(base_dir / "base_data_climbmix" / "shard_00000.parquet", ["climbmix train"])
    write_shard(base_dir / "base_data_climbmix" / "shard_06542.parquet", ["climbmix val"])
    dataset.choose_folder("base_data_climbmix")
    src = tmp_path / "src"
    _fill(src)
    assert dataset.main(["--from", str(src), "--keep-existing"]) == 0
    assert dataset.data_dir() == base_dir / "base_data" and "parquet doc 7" in iter_documents("train")
    dataset.choose_folder("base_data_climbmix")
    capsys.readouterr()
    assert dataset.main(["--from", str(src), "--keep-existing"]) == 0
    assert "already present" in capsys.readouterr().out and dataset.data_dir() == base_dir / "base_data"
