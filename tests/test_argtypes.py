"""Non-positive counts on the command lines are refused by argparse (exit 2, option named)."""

from __future__ import annotations

import argparse

import pytest

from igconda import cli
from igconda.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from ray_jobs import infer, pipeline, preprocess, train, tune


def test_converters_accept_good_values_and_refuse_bad_ones():
    assert positive_int("3") == 3
    assert non_negative_int("0") == 0
    assert positive_float("0.5") == 0.5
    assert non_negative_float("0") == 0.0
    for convert, bad in ((positive_int, "0"), (positive_int, "-2"), (positive_int, "1.5"),
                         (positive_int, "two"), (non_negative_int, "-1"), (positive_float, "0"),
                         (positive_float, "nan"), (non_negative_float, "-0.5"),
                         (non_negative_float, "nan")):
        with pytest.raises(argparse.ArgumentTypeError):
            convert(bad)


INFER = ["--checkpoint", "c", "--data", "d", "--output", "o"]
TRAIN = ["--data", "d", "--output", "o"]
TUNE = ["--checkpoint", "c", "--data", "d", "--output", "o"]
PREPROCESS = ["--manifest", "m.csv", "--output", "o"]
DETECT = ["detect", "scan.nii.gz", "--checkpoint", "c", "-o", "out.nii.gz"]

CASES = [
    # (id, parse function, argv, option the message names)
    ("infer batch 0", infer.parse_args, [*INFER, "--batch-size", "0"], "--batch-size"),
    ("infer concurrency -1", infer.parse_args, [*INFER, "--concurrency", "-1"], "--concurrency"),
    ("infer stride 0", infer.parse_args, [*INFER, "--stride", "0"], "--stride"),
    ("infer noise level 0", infer.parse_args, [*INFER, "--noise-level", "0"], "--noise-level"),
    ("infer gpus -1", infer.parse_args, [*INFER, "--num-gpus", "-1"], "--num-gpus"),
    ("train workers 0", train.parse_args, [*TRAIN, "--num-workers", "0"], "--num-workers"),
    ("train cpus 0", train.parse_args, [*TRAIN, "--cpus-per-worker", "0"], "--cpus-per-worker"),
    ("train threads 0", train.parse_args, [*TRAIN, "--torch-threads", "0"], "--torch-threads"),
    ("train epochs 0", train.parse_args, [*TRAIN, "--epochs", "0"], "--epochs"),
    ("train keep 0", train.parse_args, [*TRAIN, "--keep-checkpoints", "0"], "--keep-checkpoints"),
    ("tune max slices -1", tune.parse_args, [*TUNE, "--max-slices", "-1"], "--max-slices"),
    ("pipeline workers 0", pipeline.parse_args, ["--output", "o", "--num-workers", "0"], "--num-workers"),
    ("preprocess cpus -1", preprocess.main, [*PREPROCESS, "--num-cpus-per-volume", "-1"],
     "--num-cpus-per-volume"),
    ("detect batch 0", cli.build_parser().parse_args, [*DETECT, "--batch-size", "0"], "--batch-size"),
    ("detect stride -5", cli.build_parser().parse_args, [*DETECT, "--stride", "-5"], "--stride"),
]


@pytest.mark.parametrize("parse,argv,option", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_non_positive_counts_are_usage_errors(parse, argv, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "must be" in err


def test_zero_where_zero_means_all_is_accepted():
    assert tune.parse_args([*TUNE, "--max-slices", "0"]).max_slices == 0
    assert infer.parse_args([*INFER, "--num-gpus", "0"]).num_gpus == 0.0
