"""The comparison stage against real MLflow runs of a tiny study (a local SQLite store).

Score runs are logged through MlflowClient exactly as the contract says (tags, the per-slice
Parquet artifact with the lesion columns, a summary CSV); every expected number below is worked
out by hand from the per-slice values written here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from igconda import tracking
from igconda.comparison import (
    SCORES_ARTIFACT,
    MixedDataVersionsError,
    load_scored_runs,
    metric_table,
    metric_tables,
)
from igconda.comparison_figures import heatmap_cells, size_bins
from igconda.comparison_report import table_html, table_markdown
from igconda.data.schema import SCORE_SCHEMA

NAN = math.nan
STUDY, MIXED = "study", "mixed"
IG011, IG000 = "IgCONDA |x−x̂| (paper) (011)", "IgCONDA |x−x̂| (paper) (000)"
THR, CAM, SUP = "41% SUVmax", "ResNet-18 HiResCAM", "supervised (upper bound)"

# Nine unhealthy slices: two internal cohorts and one external one.
SLICES = pd.DataFrame({
    "patient_id": ["p1", "p1", "p2", "p3", "p3", "p4", "p5", "p5", "p6"],
    "cohort": ["lung"] * 3 + ["lymphoma"] * 3 + ["sts"] * 3,
    "role": ["internal"] * 6 + ["external"] * 3,
    "tracer": ["FDG"] * 9,
    "slice_index": [10, 11, 5, 7, 8, 2, 3, 4, 9],
    "label": [2] * 9,
    "lesion_pixels": [40, 120, 300, 25, 80, 600, 50, 200, 900],
    "n_lesions": [1, 2, 1, 1, 1, 3, 1, 1, 2],
    "lesion_size_norm": [0.02, 0.10, 0.30, 0.01, 0.06, 0.60, 0.04, 0.20, 0.45],
    "lesion_suv_mean_norm": [0.55, 0.70, 0.90, 0.40, 0.65, 0.95, 0.50, 0.80, 1.00],
})
# (method, variant) → per-slice ⌈DSC⌉, HD95, AUPRC, detected lesions, and the calibrated τ.
METHODS = {
    ("igconda_abs", "011"): ([.80, .60, .70, .50, .70, .90, .40, .60, .80],
                             [3, 5, 4, NAN, 6, 2, 8, 5, 3], -.05, [1, 1, 1, 0, 1, 3, 0, 1, 2], .12),
    ("igconda_abs", "000"): ([.60, .50, .40, .30, .50, .80, .20, .50, .70],
                             [4, 6, 5, 9, 7, 3, NAN, NAN, 4], -.05, [1, 1, 0, 0, 1, 2, 0, 1, 1], .10),
    ("threshold_41", ""): ([.70, .40, .50, .20, .60, .90, .50, .70, .60],
                           [2, 7, 6, 10, 5, 2, 6, 4, 5], -.10, [1, 0, 1, 0, 1, 3, 1, 1, 1], .50),
    ("hirescam", ""): ([.30, .20, .40, .10, .20, .50, .10, .30, .30],
                       [9, 12, 10, 15, 11, 8, 14, 10, 9], -.05, [0, 0, 1, 0, 0, 1, 0, 0, 1], .30),
    ("supervised", ""): ([.95, .90, .92, .85, .90, .97, .80, .88, .93],
                         [1, 1.5, 1, 2, 1, 1, 2.5, 1.5, 1], -.02, [1, 2, 1, 1, 1, 3, 1, 1, 2], .50),
}
OUT_SCHEMA = SCORE_SCHEMA.append(pa.field("lesion_size_norm", pa.float64())).append(
    pa.field("lesion_suv_mean_norm", pa.float64()))


def score_frame(method: str, dsc, hd95, auprc_shift, detected, tau) -> pd.DataFrame:
    frame = SLICES.copy()
    dsc, detected = np.asarray(dsc, float), np.asarray(detected)
    frame["method"] = method
    frame["dsc_max"], frame["tau_star"], frame["hd95"] = dsc, 0.3, np.asarray(hd95, float)
    frame["auprc"] = dsc + auprc_shift
    frame["n_detected"] = detected
    frame["sensitivity"] = detected / frame["n_lesions"]
    frame["dice_tau"], frame["tau"] = np.clip(dsc - 0.1, 0, 1), tau
    return frame


def log_score_run(client: MlflowClient, experiment_id: str, folder, method: str, variant: str,
                  version: str, frame: pd.DataFrame | None, start: int, status: str = "FINISHED") -> str:
    """One score run as the score jobs write it (``frame`` None: no artifact)."""
    run = client.create_run(experiment_id, start_time=start, run_name=f"score-{method}-{variant}",
                            tags={"igconda.stage": "score", "igconda.method": method,
                                  "igconda.variant": variant, "igconda.data_version": version})
    run_id = run.info.run_id
    if frame is not None:
        local = folder / run_id
        local.mkdir()
        schema = pa.schema([f for f in OUT_SCHEMA if f.name in frame.columns])
        pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False),
                       local / "per_slice_scores.parquet")
        frame.groupby("cohort")[["dsc_max"]].mean().to_csv(local / "summary.csv")
        client.log_artifacts(run_id, str(local), artifact_path="scores")
    client.set_terminated(run_id, status=status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store: ``study`` (five methods, a superseded rerun, a run without scores, one
    whose scores lack a lesion column, a failed run) and ``mixed`` (two data versions)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    study = tracking.get_or_create_experiment(uri, STUDY)
    ids = {}
    old = score_frame("threshold_41", [0.0] * 9, [1] * 9, 0, [0] * 9, .5)
    ids["superseded"] = log_score_run(client, study, root, "threshold_41", "", "v1", old, 1000)
    for n, ((method, variant), values) in enumerate(METHODS.items()):
        ids[(method, variant)] = log_score_run(client, study, root, method, variant, "v1",
                                               score_frame(method, *values), 2000 + n)
    ids["no_artifact"] = log_score_run(client, study, root, "fanogan", "", "v1", None, 3000)
    no_suv = score_frame("intensity", *METHODS[("hirescam", "")]).drop(columns="lesion_suv_mean_norm")
    ids["no_suv"] = log_score_run(client, study, root, "intensity", "", "v1", no_suv, 3002)
    ids["failed"] = log_score_run(client, study, root, "dpm_cg", "", "v1",
                                  score_frame("dpm_cg", *METHODS[("hirescam", "")]), 3001, "FAILED")
    mixed = tracking.get_or_create_experiment(uri, MIXED)
    for n, version in enumerate(("v1", "v2")):
        ids[f"mixed_{version}"] = log_score_run(
            client, mixed, root, "threshold_41", version, version,
            score_frame("threshold_41", *METHODS[("threshold_41", "")]), 4000 + n)
    return uri, ids


@pytest.fixture(scope="module")
def scored(store):
    return load_scored_runs(store[0], STUDY)


def test_loads_every_scored_method_with_its_label_and_skips_the_rest(store, scored):
    _, ids = store
    assert scored.labels == [IG000, IG011, THR, CAM, SUP]
    assert len(scored.scores) == 5 * 9 and scored.data_versions == ["v1"]
    assert set(scored.runs["run_id"]) == {ids[k] for k in METHODS}
    reasons = {s.run_id: s.reason for s in scored.skipped}
    assert reasons[ids["no_artifact"]] == f"no {SCORES_ARTIFACT} artifact"
    assert reasons[ids["failed"]] == "run status FAILED"
    assert reasons[ids["superseded"]].startswith(f"superseded by the newer run {ids[('threshold_41', '')]}")
    assert reasons[ids["no_suv"]] == (f"{SCORES_ARTIFACT} lacks the numeric lesion columns "
                                      "['lesion_suv_mean_norm']")
    assert len(reasons) == 4


def test_mixed_data_versions_are_refused_unless_one_is_chosen(store):
    uri, ids = store
    with pytest.raises(MixedDataVersionsError) as err:
        load_scored_runs(uri, MIXED)
    assert ids["mixed_v1"] in str(err.value) and ids["mixed_v2"] in str(err.value)
    assert "--data-version" in str(err.value)
    chosen = load_scored_runs(uri, MIXED, data_version="v2")
    assert chosen.runs["run_id"].tolist() == [ids["mixed_v2"]]
    assert [(s.run_id, s.reason) for s in chosen.skipped] == [(ids["mixed_v1"], "data version v1, not v2")]
    assert load_scored_runs(uri, MIXED, allow_mixed=True).data_versions == ["v1", "v2"]


def test_dsc_table_means_stds_and_best(scored):
    table = metric_table(scored, "dsc_max")
    numbers = table.numbers.set_index(["method_label", "group"])
    assert list(table.cells.columns) == ["lung", "lymphoma", "sts", "internal (all)", "external (all)"]
    # IgCONDA (011), lung: 0.8, 0.6, 0.7 → mean 0.7, population std √(0.02/3).
    assert numbers.loc[(IG011, "lung"), "mean"] == pytest.approx(0.7)
    assert numbers.loc[(IG011, "lung"), "std"] == pytest.approx(math.sqrt(0.02 / 3))
    # internal (all) pools both internal cohorts: 0.8 0.6 0.7 0.5 0.7 0.9 → 0.7 ± √(0.1/6).
    assert numbers.loc[(IG011, "internal (all)"), "mean"] == pytest.approx(0.7)
    assert numbers.loc[(IG011, "internal (all)"), "std"] == pytest.approx(math.sqrt(0.1 / 6))
    assert numbers.loc[(THR, "internal (all)"), "mean"] == pytest.approx(3.3 / 6)  # the newer run's
    assert table.cells.at[IG011, "lung"] == "0.700 ± 0.082"
    # Best per column, the supervised upper bound never: a tie on sts (0.6 and 0.6) marks both.
    assert table.not_marked == (SUP,)
    marked = {g: sorted(table.best.index[table.best[g]]) for g in table.best.columns}
    assert marked == {"lung": [IG011], "lymphoma": [IG011], "sts": [THR, IG011],
                      "internal (all)": [IG011], "external (all)": [THR, IG011]}


def test_hd95_lowest_is_best_with_defined_counts(scored):
    table = metric_table(scored, "hd95")
    numbers = table.numbers.set_index(["method_label", "group"])
    # lymphoma, IgCONDA (011): NaN, 6, 2 → 4 ± 2 over 2 of 3 slices.
    row = numbers.loc[(IG011, "lymphoma")]
    assert (row["mean"], row["std"], row["n"], row["n_slices"]) == (pytest.approx(4.0), pytest.approx(2.0), 2, 3)
    assert table.cells.at[IG011, "lymphoma"] == "4.000 ± 2.000 (n = 2/3)"
    assert table.cells.at[IG000, "sts"] == "4.000 ± 0.000 (n = 1/3)"
    marked = {g: sorted(table.best.index[table.best[g]]) for g in ("lung", "lymphoma", "sts")}
    assert marked == {"lung": [IG011], "lymphoma": [IG011], "sts": [IG000]}


def test_sensitivity_per_slice_beside_pooled_and_dice_tau_with_its_tau(scored):
    tables = {t.metric: t for t in metric_tables(scored)}
    assert [t.number for t in tables.values()] == ["1", "1b", "2", "3", "4"]
    lung = tables["sensitivity"].numbers.set_index(["method_label", "group"]).loc[(IG011, "lung")]
    assert lung["mean"] == pytest.approx(2.5 / 3) and lung["pooled"] == pytest.approx(3 / 4)
    assert tables["sensitivity"].cells.at[IG011, "lung"] == "0.833 ± 0.236; pooled 0.750 (3/4)"
    auprc = tables["auprc"].numbers.set_index(["method_label", "group"])
    assert auprc.loc[(CAM, "sts"), "mean"] == pytest.approx((0.05 + 0.25 + 0.25) / 3)
    dice_tau = tables["dice_tau"]
    assert dice_tau.numbers.set_index(["method_label", "group"]).loc[(IG011, "lung"), "mean"] == \
        pytest.approx(0.6)
    markdown = table_markdown(dice_tau)
    assert "| IgCONDA \\|x−x̂\\| (paper) (011) | 0.12 | **0.600 ± 0.082** |" in markdown
    assert "<td><strong>0.600 ± 0.082</strong></td>" in table_html(dice_tau)


def test_fig4_bins_sizes_below_half_and_gives_mean_and_sem(scored):
    binned = size_bins(scored.scores[scored.scores["method_label"] == IG011])
    dsc = binned[binned["metric"] == "dsc_max"].set_index("bin")
    # Six bins of width 1/12; the slice of size 0.6 is left out, bin 4 is empty.
    assert dsc.index.tolist() == [0, 1, 2, 3, 5] and dsc["n"].sum() == 8
    # Bin 0 holds sizes 0.02, 0.01, 0.06, 0.04: ⌈DSC⌉ 0.8, 0.5, 0.7, 0.4.
    assert dsc.loc[0, "mean"] == pytest.approx(0.6)
    assert dsc.loc[0, "sem"] == pytest.approx(math.sqrt(0.1 / 3) / 2)
    assert math.isnan(dsc.loc[1, "sem"]) and dsc.loc[5, "hi"] == pytest.approx(0.5)
    edge = pd.DataFrame({"method_label": "m", "lesion_size_norm": [0.0, 1 / 12, 0.49, 0.5, 0.7],
                         "dsc_max": [0.2, 0.6, 0.4, 1.0, 1.0], "hd95": [1.0, NAN, 3.0, 5.0, 5.0]})
    edge_bins = size_bins(edge, ("dsc_max", "hd95"))
    assert edge_bins.groupby("metric")["n"].sum().to_dict() == {"dsc_max": 3, "hd95": 2}
    assert edge_bins[edge_bins["metric"] == "dsc_max"]["bin"].tolist() == [0, 1, 5]


def test_fig6_cell_means_on_a_hand_made_case():
    frame = pd.DataFrame({
        "lesion_size_norm": [0.01, 0.019, 0.25, 0.49, 0.5, 0.03],
        "lesion_suv_mean_norm": [0.99, 1.0, 0.0, 0.5, 0.5, 0.03],
        "dsc_max": [0.4, 0.8, 0.3, 0.9, 1.0, 0.6],
        "hd95": [2.0, NAN, 7.0, 1.0, 1.0, 4.0],
    })
    means, counts = heatmap_cells(frame, "dsc_max")
    assert means.shape == counts.shape == (25, 25)
    # Size bins 0.02 wide over [0, 0.5), SUVmean bins 0.04 wide over [0, 1].
    assert counts[24, 0] == 2 and means[24, 0] == pytest.approx(0.6)
    assert means[0, 12] == pytest.approx(0.3) and means[12, 24] == pytest.approx(0.9)
    assert means[0, 1] == pytest.approx(0.6)
    assert counts.sum() == 5 and np.isnan(means).sum() == 625 - 4  # size 0.5 is out
    hd_means, hd_counts = heatmap_cells(frame, "hd95")
    assert hd_counts[24, 0] == 1 and hd_means[24, 0] == pytest.approx(2.0)


def test_compare_job_writes_the_page_and_logs_the_comparison_run(store, tmp_path, capsys):
    from ray_jobs.compare import main

    uri, ids = store
    out = tmp_path / "comparison"
    assert main(["--tracking-uri", uri, "--experiment", STUDY, "--output", str(out),
                 "--heatmap-method", IG011, "--heatmap-method", THR]) == 0
    page = (out / "comparison.html").read_text()
    for number in ("1", "1b", "2", "3", "4"):
        assert f"Table {number}:" in page
        assert len(list((out / "tables").glob(f"table{number}_*.md"))) == 1
    assert page.count("data:image/png;base64,") == 2 and "<strong>" in page
    assert ids["no_artifact"] in page and f"no {SCORES_ARTIFACT} artifact" in page
    assert (out / "figures" / "fig4_lesion_size.png").stat().st_size > 10_000
    cells = pd.read_csv(out / "figures" / "fig6_size_suv.csv")
    assert set(cells["method_label"]) == {IG000, IG011, THR, CAM, SUP}
    assert "**0.700 ± 0.082**" in (out / "comparison.md").read_text()
    assert f"skipped run {ids['failed']}" in capsys.readouterr().out

    runs = tracking.find_runs(uri, STUDY, "tags.\"igconda.stage\" = 'comparison'")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    assert runs[0]["params"]["score_runs"] == "5" and runs[0]["tags"]["igconda.data_version"] == "v1"
    assert {"comparison.html", "comparison.md", "tables", "figures"} <= set(
        tracking.list_artifacts(uri, runs[0]["run_id"]))
    # The comparison run itself is never read back as a score run.
    assert len(load_scored_runs(uri, STUDY).runs) == 5

    assert main(["--tracking-uri", uri, "--experiment", MIXED, "--output", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "data versions" in error and ids["mixed_v1"] in error
    assert main(["--tracking-uri", uri, "--experiment", STUDY, "--output", str(tmp_path / "y"),
                 "--heatmap-method", "nope"]) == 2
    assert "no such method label" in capsys.readouterr().err
