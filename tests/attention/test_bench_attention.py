"""tools/bench_attention.py's report without a GPU: each row's 'vs dense' is against the dense row of the
same run and the same mode (eager, or replayed from CUDA graphs)."""

from __future__ import annotations

from tests.tool_scripts import load_tool

META = {"device": "test", "date": "-", "torch": "-", "cudnn": 0, "command": "-", "heads": 16, "dtype": "bf16"}


def _row(backend: str, ms: float, graph: bool = False, set_name: str = "geometric") -> dict:
    row = {"head_dim": 128, "n": 8192, "set": set_name, "backend": backend, "status": "ok", "fwd_ms": 1.0,
           "fwdbwd_ms": ms, "fwd_tflops": 1.0, "fwdbwd_tflops": 1.0, "peak_gib": 1.0, "run": 1}  # fmt: skip
    if set_name != "dense":
        row["patterns"] = [[2048, 1]]
    if graph:
        row["graph"] = True
    return row


def test_graphed_rows_compare_with_graphed_dense():
    tool = load_tool("bench_attention")
    rows = [
        _row("dense-cudnn", 2.0, set_name="dense"),
        _row("dense-cudnn+graph", 1.5, graph=True, set_name="dense"),
        _row("fa4", 4.0),
        _row("fa4+graph", 1.0, graph=True),
    ]
    table = {}
    for line in tool.render_markdown([META], rows).splitlines():
        if line.startswith("| 8192"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[cells[1]] = cells[8]  # the 'vs dense' column
    assert table == {"dense-cudnn": "-", "dense-cudnn+graph": "-", "fa4": "0.5x", "fa4+graph": "1.5x"}
