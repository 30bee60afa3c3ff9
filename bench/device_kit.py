"""Prepare the device kit: what a borrowed GPU machine with no network needs for
bench/device_run.py, in one ignored folder small enough to travel with the repository.

    python bench/device_kit.py prepare                      # wheels for the borrowed machines, from PyPI
    python bench/device_kit.py prepare --wheels installed   # wheels for this machine, offline (testing the kit here)

The borrowed machines (issue 26) run CPython 3.12 on manylinux x86_64 with torch,
triton, transformers, tiktoken, numpy, pyarrow, safetensors and huggingface_hub
(DEVICE_HAS, and what those need). Our training and check path needs two more
(KIT_NEEDS); the kit holds them and every dependency of theirs the machine lacks,
at the versions installed here, so the device runs what the tests here ran.

The folder (--kit, default device_kit/ in the repository root, ignored by git):

  wheels/          one wheel per distribution (--wheels pypi: `pip download --no-deps
                   --only-binary=:all:` for --python-version and PLATFORMS; --wheels
                   installed: repacked from this interpreter's installed files)
  base/tokenizer/  a tokenizer trained by scripts.tok_train on the train shard
  data/            shard_00000.parquet (train: the corpus' first shard) and
                   shard_00001.parquet (validation: its last), each cut to its first
                   row groups when larger than SHARD_MAX_BYTES
  kit.json         what is in it: wheel files and sizes, shards, tokenizer, total bytes

It is built beside the old one and renamed over it, so a failed prepare leaves
the old kit whole. Exit status: 0 prepared, 1 a step failed (download, tokenizer,
size), 2 bad usage (no corpus).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tokenizer's check imports nanochat; this file runs as a script
DEFAULT_KIT = ROOT / "device_kit"
# The shared corpus beside the checkout (English books in the shard layout, see its README.md).
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus"
MIB = 2**20

# Issue 26: "The borrowed machines (one H100 or H200, x86_64) run Python 3.12 with torch
# 2.11.0+cu130, triton 3.6.0, transformers 5.17, tiktoken, numpy, pyarrow, safetensors, huggingface_hub".
DEVICE_HAS = ("torch", "triton", "transformers", "tiktoken", "numpy", "pyarrow", "safetensors", "huggingface_hub")
DEVICE_PYTHON = "3.12"
# What our path needs beyond DEVICE_HAS, found by running base_train and gpu_check with an import
# hook: rustbpe (nanochat/tokenizer.py imports it at the top; gpu_check trains tokenizers) and
# matplotlib (nanochat/curves.py draws the curves at every checkpoint). datasets, fastapi and uvicorn
# are only imported by tasks/, serving/ and scripts.chat_service, which the kit does not run.
KIT_NEEDS = ("rustbpe", "matplotlib")
# The machines' glibc is not known here: tags up to 2.28 (RHEL 8, Debian 10, Ubuntu 18.10 and later)
# are what every recent CUDA image has; the wheels found for KIT_NEEDS carry no newer tag.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# The device tool carries at most 64 MiB with the working tree (~2 MiB of tracked files today).
KIT_MAX_BYTES = 56 * MIB
# A shard above this is cut to its first row groups; the corpus' own shards (3-6 MiB) are copied whole.
SHARD_MAX_BYTES = 12 * MIB
# The file in a dist-info folder that lists its files; regenerated when repacking.
RECORD = "RECORD"
# Written by the installer, not part of the distribution (PEP 376, PEP 610).
INSTALL_TIME_FILES = {"INSTALLER", "REQUESTED", "direct_url.json", RECORD}


class KitError(RuntimeError):
    """A step of prepare failed; the message says which and what to do."""


# ---------------------------------------------------------------- which distributions


def marker_environment(python: str) -> dict[str, str]:
    """PEP 508 marker values of CPython `python` on Linux x86_64 (the borrowed machines, or this one)."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def closure(roots: tuple[str, ...], python: str, pin: bool = True) -> dict[str, str | None]:
    """{canonical name: version installed here} for roots and everything they require under
    `python`'s markers, read from this environment's metadata (extras left out). With pin
    False a distribution not installed here is kept with version None and not followed
    (DEVICE_HAS: this machine's CPU torch has no triton)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env, found, todo = marker_environment(python), {}, list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if not pin:
                found[name] = None
                continue
            raise KitError(f"{name} is not installed here, so the kit cannot pin its version; "
                           f"install the project (pip install -e .) and prepare again") from None
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return found


def kit_distributions(python: str) -> dict[str, str]:
    """What KIT_NEEDS brings that DEVICE_HAS (and its dependencies) does not: {name: version}."""
    device = closure(DEVICE_HAS, python, pin=False)
    return {name: version for name, version in closure(KIT_NEEDS, python).items() if name not in device}


# ---------------------------------------------------------------- wheels


def download_wheels(wanted: dict[str, str], dest: Path, python: str) -> None:
    """pip download of each pinned distribution for `python` on PLATFORMS, binary wheels only."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--python-version", python, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS),
           "-d", str(dest), *(f"{name}=={version}" for name, version in sorted(wanted.items()))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise KitError(f"pip download exited {done.returncode}: {done.stderr.strip()[-800:]}")


def escaped(name: str) -> str:
    """A distribution name as a wheel file name spells it (PEP 427)."""
    return re.sub(r"[-_.]+", "_", name)


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_tag(dist: importlib.metadata.Distribution) -> str:
    """The compressed tag set (py-abi-platform) of the wheel a distribution was installed from."""
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines() if line.startswith("Tag:")]
    if not tags:
        raise KitError(f"{dist.metadata['Name']} was not installed from a wheel (no Tag in its WHEEL file); cannot repack it")
    parts = zip(*(tag.split("-") for tag in tags))
    return "-".join(".".join(sorted(set(part))) for part in parts)


def repack_installed(name: str, dest: Path) -> Path:
    """A wheel of the installed distribution `name`, from the files its RECORD lists (scripts
    outside site-packages and byte-code left out, RECORD written anew)."""
    dist = importlib.metadata.distribution(name)
    files = [f for f in dist.files or [] if not f.parts[0] == ".." and "__pycache__" not in f.parts]
    infos = [f for f in files if f.parts[0].endswith(".dist-info")]
    if not infos:
        raise KitError(f"{name} lists no dist-info files in its RECORD; cannot repack it")
    info_dir = infos[0].parts[0]
    wheel = dest / f"{escaped(dist.metadata['Name'])}-{dist.version}-{wheel_tag(dist)}.whl"
    rows = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for f in files:
            if f.parts[0] == info_dir and f.name in INSTALL_TIME_FILES:
                continue
            data = Path(dist.locate_file(f)).read_bytes()
            archive.writestr(f.as_posix(), data)
            rows.append(f"{f.as_posix()},{record_hash(data)},{len(data)}")
        rows.append(f"{info_dir}/{RECORD},,")
        archive.writestr(f"{info_dir}/{RECORD}", "\n".join(rows) + "\n")
    return wheel


def prepare_wheels(dest: Path, source: str) -> dict[str, str]:
    """Fill dest with the kit's wheels; {distribution: version}."""
    python = DEVICE_PYTHON if source == "pypi" else f"{sys.version_info.major}.{sys.version_info.minor}"
    wanted = kit_distributions(python)
    dest.mkdir(parents=True)
    if source == "pypi":
        download_wheels(wanted, dest, python)
    else:
        for name in sorted(wanted):
            repack_installed(name, dest)
    return wanted


# ---------------------------------------------------------------- shards and tokenizer


def corpus_shards(corpus: Path) -> tuple[Path, Path]:
    """(first train shard, validation shard) of a folder in the shard layout (nanochat/shards.py)."""
    shards = sorted(corpus.glob("shard_[0-9][0-9][0-9][0-9][0-9].parquet"))
    if len(shards) < 2:
        raise ValueError(f"{corpus} holds {len(shards)} shard_NNNNN.parquet file(s); the kit needs a corpus of at "
                         "least 2 (the last is validation): pass --corpus DIR")
    return shards[0], shards[-1]


def copy_shard(source: Path, dest: Path, max_bytes: int) -> dict:
    """Copy a shard, or when it is larger than max_bytes write its leading row groups (at least one)
    that fit, with the source's compression; {rows, bytes, cut}."""
    import pyarrow.parquet as pq

    if source.stat().st_size <= max_bytes:
        shutil.copyfile(source, dest)
        return {"rows": pq.ParquetFile(dest).metadata.num_rows, "bytes": dest.stat().st_size, "cut": False}
    shard = pq.ParquetFile(source)
    meta = shard.metadata
    kept, size = [], 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        if kept and size > max_bytes:
            break
        kept.append(group)
    table = shard.read_row_groups(kept)
    compression = meta.row_group(0).column(0).compression.lower()
    pq.write_table(table, dest, compression=compression, row_group_size=meta.row_group(0).num_rows)
    return {"rows": table.num_rows, "bytes": dest.stat().st_size, "cut": True}


def train_tokenizer(base: Path, data: Path, vocab_size: int | None) -> int:
    """scripts.tok_train on the kit's train shard, into base/tokenizer (everything else it writes is
    dropped); the vocabulary size it saved."""
    from nanochat.tokenizer import Tokenizer

    cmd = [sys.executable, "-m", "scripts.tok_train", "--data-dir", str(data),
           *(["--vocab-size", str(vocab_size)] if vocab_size else [])]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "NANOCHAT_BASE_DIR": str(base)}, capture_output=True, text=True)
    if done.returncode != 0 or not (base / "tokenizer").is_dir():
        raise KitError(f"scripts.tok_train exited {done.returncode}: {(done.stdout + done.stderr).strip()[-800:]}")
    for entry in base.iterdir():
        if entry.name != "tokenizer":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return Tokenizer.load(base / "tokenizer").get_vocab_size()


# ---------------------------------------------------------------- the kit


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prepare(kit: Path, corpus: Path, wheels: str, vocab_size: int | None = None,
            shard_max_bytes: int = SHARD_MAX_BYTES, max_bytes: int = KIT_MAX_BYTES) -> dict:
    """Build the kit in kit.tmp, check its size, rename it over `kit`; return its kit.json."""
    train, val = corpus_shards(corpus)
    aside = kit.with_name(kit.name + ".tmp")
    shutil.rmtree(aside, ignore_errors=True)
    (aside / "data").mkdir(parents=True)
    shards = {"shard_00000.parquet": {"from": str(train), **copy_shard(train, aside / "data" / "shard_00000.parquet", shard_max_bytes)},
              "shard_00001.parquet": {"from": str(val), **copy_shard(val, aside / "data" / "shard_00001.parquet", shard_max_bytes)}}
    vocab = train_tokenizer(aside / "base", aside / "data", vocab_size)
    versions = prepare_wheels(aside / "wheels", wheels)
    manifest = {"made": time.strftime("%Y-%m-%d %H:%M:%S %z"), "wheels_from": wheels,
                "python": DEVICE_PYTHON if wheels == "pypi" else f"{sys.version_info.major}.{sys.version_info.minor}",
                "platforms": list(PLATFORMS) if wheels == "pypi" else "this machine", "versions": versions,
                "wheels": {w.name: w.stat().st_size for w in sorted((aside / "wheels").glob("*.whl"))},
                "shards": shards, "tokenizer_vocab_size": vocab}
    manifest["bytes"] = folder_bytes(aside)
    if manifest["bytes"] > max_bytes:
        biggest = sorted(((f.stat().st_size, f.relative_to(aside)) for f in aside.rglob("*") if f.is_file()), reverse=True)[:3]
        raise KitError(f"the kit is {manifest['bytes'] / MIB:.1f} MiB, over {max_bytes / MIB:.0f} MiB; largest: "
                       + ", ".join(f"{path} {size / MIB:.1f} MiB" for size, path in biggest))
    (aside / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(kit, ignore_errors=True)
    os.replace(aside, kit)
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prepare the device kit (wheels, tokenizer, two shards) for bench/device_run.py.")
    p.add_argument("command", choices=["prepare"])
    p.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="the folder to write (default: %(default)s)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a folder of parquet shards; its first and last "
                   "go in the kit (default: %(default)s)")
    p.add_argument("--wheels", choices=["pypi", "installed"], default="pypi", help="pypi: download for CPython "
                   f"{DEVICE_PYTHON} manylinux x86_64 (the borrowed machines); installed: repack this interpreter's own "
                   "installed files, offline, for running the kit on this machine (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=None, help="the tokenizer's vocabulary (default: scripts.tok_train's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = prepare(args.kit.resolve(), args.corpus, args.wheels, args.vocab_size)
    except ValueError as err:
        print(f"device_kit: {err}", file=sys.stderr)
        return 2
    except KitError as err:
        print(f"device_kit: {err}", file=sys.stderr)
        return 1
    wheels = ", ".join(f"{name} {version}" for name, version in sorted(manifest["versions"].items()))
    print(f"kit in {args.kit} ({manifest['bytes'] / MIB:.1f} MiB, {time.perf_counter() - t0:.0f} s): wheels for "
          f"Python {manifest['python']}: {wheels}; shards {', '.join(manifest['shards'])}; tokenizer of "
          f"{manifest['tokenizer_vocab_size']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
