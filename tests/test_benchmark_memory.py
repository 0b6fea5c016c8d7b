"""benchmarks/memory.py: saved-for-backward bytes on the meta device (no GPU, no weights)."""

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import memory  # noqa: E402


def test_memory_benchmark_orders_the_paths(tmp_path):
    out = tmp_path / "memory.json"
    result = memory.main(["--shape", "qwen2.5-0.5b", "--prompt-tokens", "600", "--generator-tokens", "300", "--out", str(out)])
    assert out.is_file()
    rows = {(r["path"], r["kernel"], r["gradient_checkpointing"]): r for r in result["paths"]}
    for kernel in ("math", "fused"):
        # one copy of the prompt instead of m: packed beats scoring the m sequences separately
        assert rows[("selector packed", kernel, False)]["total"] * 3 < rows[("selector separate", kernel, False)]["total"]
        # the repeated cache keeps m copies of the prompt's keys and values
        assert rows[("selector packed", kernel, False)]["total"] < rows[("selector repeated cache", kernel, False)]["total"]
        for path in ("selector packed", "generator"):
            assert rows[(path, kernel, True)]["peak"] < rows[(path, kernel, False)]["peak"] / 3
    # the repeated-cache path has no row under checkpointing: transformers turns the cache off there
    assert ("selector repeated cache", "math", True) not in rows
