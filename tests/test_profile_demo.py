"""benchmarks/profile_demo.py on the tiny config: both phases profiled and tabled."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_profile_tables_both_phases_with_shares_that_add_up(tmp_path, repo_root, capsys):
    bench = load_benchmark("profile_demo")
    out = tmp_path / "profile.md"
    assert bench.main(["--config", str(repo_root / "configs" / "test.yaml"), "--steps", "2",
                       "--warmup", "1", "--batch-size", "2", "--top", "5", "--fp32",
                       "--output", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "2 training steps" in text and "one counterfactual batch of 2 slices" in text
    assert "autocast None" in text  # --fp32: no autocast
    # Each phase lists operators with their share of self CPU time; shares stay within 100 %.
    phases: list[list[float]] = []
    for line in text.splitlines():
        if line.startswith("**"):
            phases.append([])
        elif line.startswith("| `"):
            phases[-1].append(float(line.split("|")[-2]))
    assert len(phases) == 2
    for shares in phases:
        assert len(shares) == 5 and 0 < sum(shares) <= 100.5, shares
        assert shares == sorted(shares, reverse=True)  # largest first
