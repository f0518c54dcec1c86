"""The `skinsense` command: each form works, and bad input gets a clear message."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from skinsense.cli import build_parser, main

FIXTURE = "tests/fixtures/HAM10000_metadata.csv"


def test_split_writes_the_three_parts(tmp_path, capsys):
    assert main(["split", "--metadata", FIXTURE, "--out", str(tmp_path), "--seed", "7"]) == 0
    parts = {name: pd.read_csv(tmp_path / f"{name}.csv") for name in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 10015
    assert list(parts["train"].columns) == list(pd.read_csv(FIXTURE, nrows=1).columns)
    lesions = [set(p["lesion_id"]) for p in parts.values()]
    assert not (lesions[0] & lesions[1] or lesions[0] & lesions[2] or lesions[1] & lesions[2])
    assert "train: " in capsys.readouterr().out


def test_split_of_a_missing_file_says_so(tmp_path, capsys):
    assert main(["split", "--metadata", str(tmp_path / "nope.csv"), "--out", str(tmp_path)]) != 0
    assert "nope.csv" in capsys.readouterr().err


def test_synth_then_fetch_from_the_folder(tmp_path, capsys, home):
    assert main(["synth", "--out", str(tmp_path / "s"), "--images", "40", "--seed", "2"]) == 0
    assert main(["fetch", "--source", str(tmp_path / "s")]) == 0
    assert "validated 40 images (0 left out)" in capsys.readouterr().out


def test_fetch_from_a_missing_path_says_what_to_do(tmp_path, capsys, home):
    assert main(["fetch", "--source", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--archs", "efficientnet_b0,not_a_net"], "unknown architecture"),
    (["--epochs", "0"], "epochs"),
    (["--archs", "maxvit_t", "--image-size", "100"], "multiples of 224"),
])
def test_pipeline_rejects_bad_settings_before_running(argv, message, capsys, home):
    assert main(["pipeline", "--data-source", "x", *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_of_an_unknown_model_says_what_to_pass(capsys, home):
    assert main(["serve", "--model-uri", "models:/nope@champion", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "models:/nope@champion" in err and "registry show" in err


def _command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command and subcommand of `parser`, as the words that name it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name)
                yield from _command_paths(sub, (*path, name))


def test_every_command_answers_help(capsys):
    paths = list(_command_paths(build_parser()))
    assert [p[0] for p in paths if len(p) == 1] == [
        "synth", "fetch", "split", "pipeline", "serve", "registry", "stack", "train-node",
        "deploy", "feedback"]
    assert {p for p in paths if len(p) == 2} == {
        ("registry", "show"), ("registry", "promote"), ("registry", "rollback"),
        ("feedback", "add"), ("feedback", "list")}
    for path in paths:
        with pytest.raises(SystemExit) as exited:
            main([*path, "--help"])
        assert exited.value.code == 0, path
        out = capsys.readouterr().out
        assert out.split()[:2 + len(path)] == ["usage:", "skinsense", *path], out[:200]
        assert "-h, --help" in out
