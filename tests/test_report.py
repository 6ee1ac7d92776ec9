"""The report: figures, the side-by-side methods table, the self-contained HTML page, the study
report built from a study folder, and that the page renders in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from igconda import figures, report, report_html, report_tables

METHODS = ("IgCONDA", "41% SUVmax", "raw intensity")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _per_slice(rng: np.random.Generator, n: int = 12) -> pd.DataFrame:
    rows = []
    for method_index, method in enumerate(METHODS):
        for cohort, role in (("lymphoma", "internal"), ("lung", "internal"), ("sarcoma_ext", "external")):
            for i in range(n):
                lesions = int(rng.integers(1, 3))
                rows.append({
                    "method": method, "cohort": cohort, "role": role, "patient_id": f"{cohort}{i % 3}",
                    "slice_index": i, "lesion_pixels": int(rng.integers(2, 200)),
                    "dsc_max": float(np.clip(0.7 - 0.25 * method_index + rng.normal(0, 0.1), 0, 1)),
                    "tau_star": 0.3, "hd95": float(rng.uniform(1, 10)), "auprc": float(rng.uniform(0, 1)),
                    "n_lesions": lesions, "n_detected": int(rng.integers(0, lesions + 1)),
                })
    return pd.DataFrame(rows)


def _grid() -> pd.DataFrame:
    rows = [{"noise_level": d, "guidance_scale": w, "stride": 10,
             "mean_dsc": 0.5 - abs(d - 400) / 1000 - abs(w - 3) / 20, "mean_auprc": 0.4}
            for d in (200, 400, 600) for w in (1.0, 3.0, 5.0)]
    return pd.DataFrame(rows)


def _slices(n: int = 3, size: int = 16):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 4:8, 5:9] = 1
    cf = images * 0.8
    maps = np.abs(images - cf)
    return images, masks, cf, maps, (maps > 0.1).astype(np.uint8)


# ------------------------------------------------------------------ figures


def test_qualitative_figure_has_five_rows_per_slice():
    fig = figures.qualitative_figure(*_slices(3), titles=["a", "b", "c"])
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 15
    labels = [ax.get_ylabel() for ax in fig.axes if ax.images and ax.get_ylabel()]
    assert labels == ["PET", "Ground truth", "Counterfactual", "Anomaly map", "Binarised map"]
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]


def test_qualitative_figure_can_show_the_unguided_decode():
    images, masks, cf, maps, binarised = _slices(2)
    fig = figures.qualitative_figure(images, masks, cf, maps, binarised, unguided=images * 0.9,
                                    map_label="max(x − x̂, 0)")
    labels = [ax.get_ylabel() for ax in fig.axes if ax.images and ax.get_ylabel()]
    assert labels == ["PET", "Ground truth", "Counterfactual", "Unguided (w = 0)", "Anomaly map",
                      "Binarised map"]
    assert any(ax.get_ylabel() == "max(x − x̂, 0)" for ax in fig.axes if not ax.images)
    with pytest.raises(ValueError, match="unguided"):
        figures.qualitative_figure(images, masks, cf, maps, binarised, unguided=images[:1])


def test_qualitative_figure_rejects_mismatched_inputs():
    images, masks, cf, maps, binarised = _slices(3)
    with pytest.raises(ValueError, match="masks"):
        figures.qualitative_figure(images, masks[:2], cf, maps, binarised)
    with pytest.raises(ValueError, match="titles"):
        figures.qualitative_figure(images, masks, cf, maps, binarised, titles=["x"])


def test_display_slice_is_radiological():
    image = np.zeros((4, 5))
    image[3, 4] = 1  # largest X (RAS+: most to the patient's right), largest Y (most anterior)
    shown = figures.display_slice(image)
    assert shown.shape == (5, 4)
    assert shown[0, 0] == 1  # anterior at the top, the patient's right on the viewer's left


def test_lesion_size_figure_one_panel_per_cohort_one_line_per_method():
    fig = figures.lesion_size_figure(_per_slice(np.random.default_rng(0)), pixel_area_mm2=4.0)
    panels = [ax for ax in fig.axes if ax.collections]
    assert sorted(ax.get_title() for ax in panels) == ["lung", "lymphoma", "sarcoma_ext"]
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == list(METHODS)
    assert "mm²" in panels[0].get_xlabel()


def test_lesion_size_figure_requires_columns():
    with pytest.raises(ValueError, match="lesion_pixels"):
        figures.lesion_size_figure(pd.DataFrame({"method": [], "cohort": [], "dsc_max": []}))


def test_heatmap_marks_the_best_cell():
    grid = _grid()
    fig = figures.heatmap_figure(grid)
    ax = fig.axes[0]
    (rect,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    # Best (D=400, w=3) is the middle row and column of the 3 × 3 grid.
    assert rect.get_xy() == (0.5, 0.5)
    assert "D=400" in ax.get_title() and "w=3" in ax.get_title()
    assert len(ax.texts) == 9


def test_heatmap_leaves_unevaluated_pairs_blank():
    grid = _grid().iloc[[0, 4, 8]]  # a random search's three pairs
    fig = figures.heatmap_figure(grid)
    assert len(fig.axes[0].texts) == 3


def test_training_curves_mark_best_epoch():
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "train_loss": [1.0, 0.5, 0.3, 0.2],
                            "valid_loss": [1.1, np.nan, 0.25, 0.4]})
    fig = figures.training_curves_figure(history)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()][:2] == ["train loss", "validation loss"]
    assert any("best epoch 3" in t.get_text() for t in ax.texts)


# ------------------------------------------------------------------ tables


def test_methods_table_puts_every_method_side_by_side():
    table = report_tables.methods_table(_per_slice(np.random.default_rng(0)))
    for metric in ("⌈DSC⌉", "HD95 (px)", "AUPRC", "Sensitivity (pooled)"):
        assert [m for t, m in table.columns if t == metric] == list(METHODS)
    assert {"lymphoma", "lung", "sarcoma_ext", "internal (all)", "external (all)"} <= set(table.index)
    cell = table.loc["lymphoma", ("⌈DSC⌉", "IgCONDA")]
    assert re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", cell)
    assert table.loc["lymphoma", ("unhealthy slices", "")] == 12


def test_metric_titles_have_one_owner():
    """The metric titles are spelled once (igconda.evaluation); every table uses them."""
    from igconda import evaluation

    assert report_tables.METRIC_TITLES is evaluation.METRIC_TITLES
    spelled = [p.name for p in Path(evaluation.__file__).parent.rglob("*.py")
               if "METRIC_TITLES = " in p.read_text(encoding="utf-8")]
    assert spelled == ["evaluation.py"]
    table = report_tables.methods_table(_per_slice(np.random.default_rng(0)))
    titles = {t for t, _ in table.columns} - {"unhealthy slices"}
    assert titles <= set(evaluation.METRIC_TITLES.values())


def test_methods_table_shows_dice_at_tau_and_the_control_in_the_given_order():
    frame = _per_slice(np.random.default_rng(1))
    control = frame[frame.method == "IgCONDA"].assign(method="w = 0 control")
    frame = pd.concat([frame, control], ignore_index=True)
    frame["dice_tau"] = np.where(frame.method == "raw intensity", np.nan, 0.25)
    frame["tau"] = np.where(frame.method == "raw intensity", np.nan, 0.04)
    table = report_tables.methods_table(frame, order=["w = 0 control", "IgCONDA"])
    assert [m for t, m in table.columns if t == "Dice@τ"] == [
        "w = 0 control", "IgCONDA", "41% SUVmax", "raw intensity"]
    assert table.loc["lung", ("Dice@τ", "IgCONDA")] == "0.250 ± 0.000"
    assert table.loc["lung", ("Dice@τ", "raw intensity")] == "–"
    taus = report_tables.thresholds_table(frame)
    assert taus.loc["IgCONDA", "τ"] == "0.04" and taus.loc["raw intensity", "τ"] == "–"


# ------------------------------------------------------------------ HTML


def _write_page(path: Path) -> Path:
    return report_html.write_html_report(
        path, title="Study <test>",
        tables={"Per-cohort": report_tables.methods_table(_per_slice(np.random.default_rng(0))),
                "Grid": _grid()},
        figures={"Heatmap": figures.heatmap_figure(_grid()),
                 "Qualitative": figures.qualitative_figure(*_slices(2))},
        config={"infer": {"noise_level": 400, "guidance_scale": 3.0}},
        versions=report_html.software_versions(), notes=["tuning skipped & <b>not</b> html"],
    )


def test_html_report_is_self_contained_with_every_section(tmp_path):
    path = _write_page(tmp_path / "out" / "report.html")
    text = path.read_text()
    for section in ("Table: Per-cohort", "Table: Grid", "Figure: Heatmap", "Figure: Qualitative",
                    "Configuration", "Software versions", "Notes"):
        assert section in text
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:|file:|//)', text)  # nothing external
    assert "noise_level: 400" in text
    for package in ("python", "torch", "monai", "ray", "mlflow", "numpy", "igconda"):
        assert f"<th>{package}</th>" in text
    assert "Study &lt;test&gt;" in text and "&lt;b&gt;not&lt;/b&gt;" in text  # escaped
    assert "41% SUVmax" in text and "raw intensity" in text
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp files left


RAW_NAMES = {"IgCONDA": "igconda", "41% SUVmax": "threshold_41", "raw intensity": "intensity"}


def _study(tmp_path: Path, *, complete: bool) -> Path:
    """A study folder shaped like the pipeline's (ray_jobs.infer / ray_jobs.train outputs)."""
    import torch

    study = tmp_path / "study"
    for sub in ("tune", "infer/tables", "infer/figures", "train/best"):
        (study / sub).mkdir(parents=True)
    (study / "train" / "best" / "config.yaml").write_text("infer:\n  noise_level: 4\n")
    per_slice = _per_slice(np.random.default_rng(0), n=4)
    per_slice["method"] = per_slice["method"].map(RAW_NAMES)  # as the inference job names them
    if complete:
        _grid().to_csv(study / "tune" / "grid.csv", index=False)
        (study / "tune" / "best.json").write_text(json.dumps({"noise_level": 400, "guidance_scale": 3.0,
                                                              "stride": 10, "mean_dsc": 0.5}))
        torch.save({"history": [{"epoch": 1.0, "train_loss": 1.0, "valid_loss": 1.0},
                                {"epoch": 2.0, "train_loss": 0.5, "valid_loss": 0.6}]},
                   study / "train" / "best" / "train_state.pt")
    if complete:
        per_slice.to_csv(study / "infer" / "tables" / "per_slice_metrics.csv", index=False)
        fig = figures.qualitative_figure(*_slices(2))
        fig.savefig(study / "infer" / "figures" / "qualitative_lung.png", dpi=40)
        fig.savefig(study / "infer" / "figures" / "lesion_size.png", dpi=40)
    pd.DataFrame({"method": ["igconda"], "group": ["lung"], "dsc_max_mean": [0.5]}).to_csv(
        study / "infer" / "tables" / "methods.csv", index=False)
    return study


def test_build_study_report_gathers_every_stage(tmp_path):
    study = _study(tmp_path, complete=True)
    path = report.build_study_report(study, study / "report.html")
    text = path.read_text()
    for part in ("Per-cohort results, every method", "Tuning grid", "Chosen (D, w, map kind, τ)",
                 "Training curves", "lesion size", "Qualitative examples", "paper Fig. 5",
                 "Configuration", "Software versions"):
        assert part in text, part
    for method in METHODS:  # display names, not the stages' internal ones
        assert f">{method}<" in text, method
    assert "threshold_41" not in text
    assert "infer/tables/methods.csv" not in text  # superseded by the side-by-side table
    assert text.count("<img ") == 4  # heatmap, curves, lesion size, one qualitative
    assert "epochs after it are not shown" in text  # history came from the checkpoint state


def test_build_study_report_notes_missing_parts(tmp_path):
    study = _study(tmp_path, complete=False)
    text = report.build_study_report(study, tmp_path / "r.html").read_text()
    assert "No tuning grid" in text and "No training history" in text
    assert "No qualitative figure" in text
    assert "infer/tables/methods.csv" in text  # what exists is still shown
    empty = tmp_path / "empty"
    empty.mkdir()
    text = report.build_study_report(empty, tmp_path / "e.html").read_text()
    assert "No inference results" in text and "No configuration found" in text


# ------------------------------------------------------------------ rendering


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("IGCONDA_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required (IGCONDA_REQUIRE_CHROMIUM=1) but not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    page = _write_page(tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1280,2000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), f"no screenshot; chromium said: {result.stderr[-2000:]}"
    pixels = plt.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert float(pixels[..., :3].var()) > 1e-3  # not a blank page
    if os.environ.get("IGCONDA_SCREENSHOT_DIR"):  # keep it to look at
        shutil.copy(shot, Path(os.environ["IGCONDA_SCREENSHOT_DIR"]) / "report_screenshot.png")


def test_figures_are_matplotlib_figures():
    assert isinstance(figures.heatmap_figure(_grid()), Figure)


def test_data_coverage_tables_from_a_dataset_summary(tmp_path):
    summary = {
        "unhealthy_slices": {"train": {"lung": 12, "psma": 3}, "test": {"lung": 4, "psma": 0}},
        "coverage": {"cohorts": {"lung": {"lesion_voxels": 100, "lesion_voxels_outside": 10,
                                          "fraction_outside": 0.1}}},
        "warnings": ["cohort psma has no unhealthy slice in split test"],
    }
    tables = report_tables.data_coverage_tables(summary)
    counts = next(t for k, t in tables.items() if k.startswith("Unhealthy slices"))
    assert counts.loc["psma", "test"] == 0 and counts.loc["lung", "train"] == 12
    coverage = next(t for k, t in tables.items() if k.startswith("Lesion voxels outside"))
    assert coverage.loc["lung", "lesion_voxels_outside"] == 10
    assert report_tables.data_coverage_tables({}) == {}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(summary))
    page = report.build_study_report(tmp_path, tmp_path / "report.html").read_text()
    assert "Unhealthy slices per cohort and split" in page
    assert "no unhealthy slice in split test" in page


def test_the_report_reads_only_the_stages_declared_outputs(tmp_path):
    """Files no stage writes (an old per-slice Parquet, a history CSV) are not guessed at."""
    study = _study(tmp_path, complete=False)
    (study / "infer" / "tables" / "methods.csv").unlink()
    _per_slice(np.random.default_rng(0)).to_parquet(study / "infer" / "per_slice.parquet")
    pd.DataFrame({"epoch": [1], "train_loss": [1.0], "valid_loss": [1.0]}).to_csv(
        study / "train" / "history.csv", index=False)
    text = report.build_study_report(study, tmp_path / "r.html").read_text()
    assert "No inference results" in text and "No training history" in text
    assert "Per-cohort results" not in text and "Training curves</" not in text
