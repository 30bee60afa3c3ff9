"""Shard downloads against a real HTTP server on 127.0.0.1 that misbehaves on purpose (retried), and
against no server at all (a closed port, a name that does not resolve: one message in seconds)."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import make_shards, write_shard
from nanochat import dataset
from nanochat.download import DownloadError, Unreachable, check_reachable, download_file

ROOT = Path(__file__).resolve().parents[1]

# each test takes about a second against a local server; retries that never end fail in a minute, not five
pytestmark = pytest.mark.timeout(60)


class ShardServer:
    """Serves files from a folder. `faults[name]` is a list of what to do on
    successive requests for that file: "503", "cut" (half the body, then hang
    up), "garbage" (right length, wrong bytes); once the list is used up the
    file is served properly. Range requests are honoured."""

    def __init__(self, root: Path):
        self.root, self.faults, self.log = root, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        name = req.path.lstrip("/")
        rng = req.headers.get("Range")
        self.log.append((name, rng))
        path = self.root / name
        if not path.is_file():
            req.send_error(404)
            return
        body = path.read_bytes()
        fault = self.faults.get(name, []).pop(0) if self.faults.get(name) else None
        if fault == "503":
            req.send_error(503)
            return
        if fault == "garbage":
            body = b"x" * len(body)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        req.send_response(206 if rng else 200)
        if rng:
            req.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        req.send_header("Content-Length", str(len(body) - start))
        req.end_headers()
        payload = body[start:]
        if fault == "cut":
            req.wfile.write(payload[: len(payload) // 2])
            req.wfile.flush()
            req.close_connection = True
            return
        req.wfile.write(payload)

    def requests_for(self, name: str) -> list:
        return [r for r in self.log if r[0] == name]

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server(tmp_path):
    make_shards(tmp_path / "remote", num_shards=5, docs_per_shard=300, rows_per_group=100)
    srv = ShardServer(tmp_path / "remote")
    yield srv
    srv.close()


def fetch(server, dest: Path, n: int, retries: int = 4) -> list[int]:
    return dataset.download_shards(
        dataset.shards_to_fetch(n, last_shard=4), base_url=server.url, directory=dest, workers=3, retries=retries, backoff=0.01
    )


def same_bytes(a: Path, b: Path) -> bool:
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_downloads_first_n_plus_validation_shard(server, tmp_path):
    dest = tmp_path / "data"
    assert fetch(server, dest, 2) == []
    assert sorted(dataset.list_shards(dest)) == [0, 1, 4]
    assert list(dataset.split_shards("val", dest)) == [4]
    for name in ("shard_00000.parquet", "shard_00004.parquet"):
        assert same_bytes(dest / name, server.root / name)


def test_server_failing_twice_then_succeeding(server, tmp_path):
    server.faults["shard_00000.parquet"] = ["503", "503"]
    dest = tmp_path / "data"
    assert fetch(server, dest, 1) == []
    assert len(server.requests_for("shard_00000.parquet")) == 3
    assert same_bytes(dest / "shard_00000.parquet", server.root / "shard_00000.parquet")


def test_connection_cut_short_resumes_with_range(server, tmp_path):
    # Incompressible text, so the shard spans many read chunks and the cut keeps some of them.
    rnd = random.Random(0)
    docs = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(2000)) for _ in range(200)]
    write_shard(server.root / "shard_00001.parquet", docs, rows_per_group=50)
    server.faults["shard_00001.parquet"] = ["cut"]
    dest = tmp_path / "data"
    assert fetch(server, dest, 2) == []
    reqs = server.requests_for("shard_00001.parquet")
    assert len(reqs) == 2 and reqs[1][1] is not None and reqs[1][1].startswith("bytes=")
    assert same_bytes(dest / "shard_00001.parquet", server.root / "shard_00001.parquet")


def test_always_cut_short_leaves_no_complete_looking_shard(server, tmp_path):
    server.faults["shard_00001.parquet"] = ["cut"] * 10
    dest = tmp_path / "data"
    assert fetch(server, dest, 2, retries=3) == [1]
    assert 1 not in dataset.list_shards(dest)
    assert not (dest / "shard_00001.parquet").exists()
    assert sorted(dataset.list_shards(dest)) == [0, 4]


def test_garbage_body_is_rejected_and_refetched(server, tmp_path):
    server.faults["shard_00000.parquet"] = ["garbage"]
    dest = tmp_path / "data"
    assert fetch(server, dest, 1) == []
    assert same_bytes(dest / "shard_00000.parquet", server.root / "shard_00000.parquet")


def test_missing_file_fails_without_retrying(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download_file(f"{server.url}/nope.parquet", tmp_path / "nope.parquet", retries=5, backoff=0.01)
    assert len(server.requests_for("nope.parquet")) == 1


def test_present_shards_are_not_fetched_again(server, tmp_path):
    dest = tmp_path / "data"
    fetch(server, dest, 1)
    before = len(server.log)
    assert fetch(server, dest, 2) == []
    assert [r[0] for r in server.log[before:]] == ["shard_00001.parquet"]


def test_checksum_mismatch_is_an_error(server, tmp_path):
    with pytest.raises(DownloadError, match="checksum"):
        download_file(f"{server.url}/shard_00000.parquet", tmp_path / "x.parquet", sha256="0" * 64, retries=2, backoff=0.01)
    assert not (tmp_path / "x.parquet").exists()


def test_file_url_source(tmp_path):
    make_shards(tmp_path / "remote", num_shards=3, docs_per_shard=10, rows_per_group=5)
    dest = tmp_path / "data"
    rc = dataset.main(["-n", "1", "--url", (tmp_path / "remote").as_uri(), "--last-shard", "2", "--data-dir", str(dest)])
    assert rc == 0 and sorted(dataset.list_shards(dest)) == [0, 2]


def test_cli_exit_codes(server, tmp_path):
    dest = tmp_path / "data"
    ok = ["-n", "2", "--url", server.url, "--last-shard", "4", "--data-dir", str(dest), "--backoff", "0.01"]
    assert dataset.main(ok) == 0
    server.faults["shard_00002.parquet"] = ["503"] * 10
    assert dataset.main(["-n", "3", "--url", server.url, "--last-shard", "4", "--data-dir", str(dest), "--retries", "2", "--backoff", "0.01"]) == 1


def closed_port_url() -> str:
    with socket.socket() as s:  # bound, then closed: nothing listens there, so connecting is refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# .invalid never resolves (RFC 2606); the closed port is refused at once
@pytest.mark.parametrize("url", [closed_port_url(), "http://nanochat-shards.invalid/fineweb"])
def test_unreachable_server_fails_in_seconds_with_the_offline_command(url, tmp_path, capsys):
    started = time.monotonic()
    # default retries and backoff: retried, these would take half a minute
    rc = dataset.main(["-n", "2", "--url", url, "--last-shard", "4", "--data-dir", str(tmp_path / "data")])
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert rc == 3 and "unreachable" in err and url in err
    assert "./speedrun.sh --tiny --data PATH" in err and "./prepare.sh --from PATH" in err
    assert not list((tmp_path / "data").iterdir())


def test_unreachable_only_before_the_transfer_a_cut_mid_transfer_is_retried(server, tmp_path):
    server.faults["shard_00000.parquet"] = ["cut", "503"]
    dest = tmp_path / "data"
    assert dataset.main(["-n", "1", "--url", server.url, "--last-shard", "4", "--data-dir", str(dest), "--backoff", "0.01"]) == 0
    assert len(server.requests_for("shard_00000.parquet")) == 3


def test_reachability_probe_goes_through_the_configured_proxy(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", closed_port_url())
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(Unreachable, match="proxy"):
        check_reachable("http://example.org/data")  # the proxy is what must answer, not example.org
    monkeypatch.setenv("HTTP_PROXY", server.url)
    check_reachable("http://nanochat-shards.invalid/data")


def test_prepare_sh_offline_says_so_within_seconds(base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_URL": closed_port_url()}
    started = time.monotonic()
    done = subprocess.run(["bash", "prepare.sh", "--shards", "1", "--no-wandb"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    # a Python start (a few seconds on a busy machine) and one refused connection, no retries
    assert time.monotonic() - started < 15
    assert done.returncode != 0 and "unreachable" in done.stderr and "./speedrun.sh --tiny --data PATH" in done.stderr
    assert "run again to retry" not in done.stderr


# ---------------------------------------------------------------- datasets (the registry, --dataset)


def test_climbmix_is_fetched_resumably_and_verified_into_its_own_folder_which_the_readers_then_use(server, base_dir, capsys):
    rnd = random.Random(0)  # incompressible, so the cut shard spans many read chunks and keeps some of them
    write_shard(server.root / "shard_00001.parquet", ["".join(rnd.choice("abcdefghij ") for _ in range(2000)) for _ in range(200)])
    write_shard(server.root / "shard_06542.parquet", [f"climbmix validation document {d}" for d in range(50)])
    server.faults = {"shard_00001.parquet": ["cut"], "shard_06542.parquet": ["garbage"]}
    assert dataset.main(["-n", "2", "--dataset", "climbmix", "--url", server.url, "--backoff", "0.01"]) == 0
    folder = base_dir / "base_data_climbmix"
    assert sorted(dataset.list_shards(folder)) == [0, 1, dataset.DATASETS["climbmix"].last_shard] == [0, 1, 6542]
    resumed = server.requests_for("shard_00001.parquet")
    assert len(resumed) == 2 and resumed[1][1].startswith("bytes=")
    assert len(server.requests_for("shard_06542.parquet")) == 2  # the garbage copy was rejected and fetched again
    for name in ("shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"):
        assert same_bytes(folder / name, server.root / name)
    assert not (base_dir / "base_data").exists()
    # the readers (tokenizer training, pretraining) now use it without being told
    assert dataset.data_dir() == folder and list(dataset.split_shards("val")) == [6542]
    capsys.readouterr()
    assert dataset.main(["--which"]) == 0 and capsys.readouterr().out == "climbmix\n"
    # and a download without --dataset continues ClimbMix (prepare.sh again, its background download)
    assert dataset.main(["-n", "3", "--url", server.url, "--backoff", "0.01"]) == 0
    assert sorted(dataset.list_shards(folder)) == [0, 1, 2, 6542]


@pytest.mark.parametrize("name, folder, url", [
    ("fineweb-edu", "base_data", "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"),
    ("climbmix", "base_data_climbmix", "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"),
])
def test_each_dataset_asks_its_hub_address_and_fineweb_stays_the_default(name, folder, url, base_dir, monkeypatch, capsys):
    # The Hub itself is not reached: the proxy in front of it is a closed port, so the probe fails and says
    # which address it was for. FineWeb-EDU with no --dataset, in a base dir where nothing was chosen yet.
    monkeypatch.setenv("HTTPS_PROXY", closed_port_url())
    for var in ("NANOCHAT_DATA_URL", "NO_PROXY", "no_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    chosen = [] if name == "fineweb-edu" else ["--dataset", name]
    assert dataset.main(["-n", "1", *chosen]) == 3
    assert f"(shards from {url})" in capsys.readouterr().err
    assert dataset.data_dir() == base_dir / folder


def test_an_unknown_dataset_is_refused_with_the_choices(base_dir, capsys):
    with pytest.raises(SystemExit) as stopped:
        dataset.main(["-n", "1", "--dataset", "climbmx"])
    assert stopped.value.code == 2
    assert "invalid choice: 'climbmx' (choose from 'fineweb-edu', 'climbmix')" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        dataset.main(["--from", str(base_dir), "--dataset", "climbmix"])
    assert stopped.value.code == 2 and "--from imports your own corpus instead" in capsys.readouterr().err
    assert not base_dir.exists()  # nothing chosen, nothing fetched


def test_prepare_sh_passes_dataset_on_and_refuses_an_unknown_one(base_dir):
    assert "--dataset NAME" in subprocess.run(["bash", "prepare.sh", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    done = subprocess.run(["bash", "prepare.sh", "--dataset", "bogus", "--no-wandb"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "'fineweb-edu', 'climbmix'" in done.stderr
    assert not (base_dir / "pretraining_folder.txt").exists()
