"""igconda.progress: bars that read well off a terminal, used by the library and the jobs alike."""

from __future__ import annotations

import dataclasses
import io
import re

from igconda.data.build import build_dataset
from igconda.data.phantoms import generate_study
from igconda.progress import progress
from tests.data.test_phantoms import ALL_COHORTS
from tests.data.test_preprocess_job import CONFIG, make_study


def test_off_a_terminal_a_bar_writes_a_few_plain_lines_not_carriage_returns():
    out = io.StringIO()  # not a terminal, like CI or `ray job submit` logs
    bar = progress(500, "infer", "slice", file=out)
    for _ in range(500):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # The start and the end (an update each LINE_INTERVAL_S in between): never one per update.
    assert 2 <= len(lines) <= 3, lines
    assert lines[0].startswith("infer:") and "0/500" in lines[0]
    assert "500/500" in lines[-1] and lines[-1].count("500/500") == 1
    assert sum("500/500" in line for line in lines) == 1  # closing does not repeat the last line


def test_a_disabled_bar_draws_nothing_but_still_counts():
    out = io.StringIO()
    with progress(3, "detect", "slice", file=out, disable=True) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def _assert_plain_lines(text: str, desc: str, total: int) -> None:
    assert "\r" not in text, text
    lines = [line for line in text.splitlines() if line.startswith(f"{desc}:")]
    assert lines and f"{total}/{total}" in lines[-1], text


def test_preprocessing_bar_off_a_terminal_is_plain_lines(tmp_path, capsys):
    manifest = make_study(tmp_path / "study")
    build_dataset(manifest, tmp_path / "data", CONFIG, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err, err
    last = [line for line in err.splitlines() if line.startswith("preprocess:")][-1]
    done = re.search(r"(\d+)/(\d+) \[", last)
    assert done and done[1] == done[2] and int(done[1]) > 0, last  # every volume counted


def test_phantom_bar_off_a_terminal_is_plain_lines(tmp_path, capsys):
    config = dataclasses.replace(ALL_COHORTS, cohorts={"lung": 1}, negative_controls=1)
    generate_study(tmp_path / "study", config, progress=True)
    _assert_plain_lines(capsys.readouterr().err, "phantoms", 2)
