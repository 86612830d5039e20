"""The ``canonwrap`` command line: help on every subcommand, clear errors with a non-zero code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from canonwrap.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = {
    "demo": ["--out", "--group", "--canonicalizer", "--epochs", "--no-export"],
    "train": ["--backbone", "--data", "--group", "--canonicalizer", "--num-classes", "--epochs", "--batch-size", "--lr", "--out"],
    "eval": ["checkpoint", "--data", "--angle-step", "--no-baseline", "--json"],
    "export": ["checkpoint", "--out", "--opset", "--exporter"],
    "verify": ["checkpoint", "onnx", "--data", "--limit"],
}


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "canonwrap.cli", "--help"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: canonwrap")
    for name in SUBCOMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: canonwrap {command}")
    for option in SUBCOMMANDS[command]:
        assert option in out, option


def test_version(capsys):
    import canonwrap

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"canonwrap {canonwrap.__version__}"


def test_usage_errors_exit_with_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])  # a subcommand is required
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "ckpt"])  # --out is required
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["eval", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("canonwrap eval: error:") and f"no canonwrap checkpoint at {missing}" in err
    assert main(["export", str(missing), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--backbone", "canonwrap:digitnett"], "Did you mean 'digitnet'?"),
        (["--backbone", "canonwrap:digitnet", "--group", "c9"], "unknown group 'c9'"),
        (["--backbone", "canonwrap:digitnet", "--canonicalizer", "orbitt"], "Did you mean 'orbit'?"),
    ],
)
def test_train_with_unknown_names(tmp_path, capsys, args, expected):
    code = main(["train", *args, "--out", str(tmp_path / "ckpt"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("canonwrap train: error:") and expected in err
    assert not (tmp_path / "ckpt").exists()  # failed before writing anything
