"""The objective command's defaults: who the author is and which control plane it talks to."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from services.cli import build_parser
from services.control.cli import DEFAULT_TARGET, author, control_target


def test_the_author_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDV_AUTHOR", "alice")
    assert author() == "alice"
    monkeypatch.delenv("RDV_AUTHOR")
    monkeypatch.setenv("USER", "bob")
    assert author() == f"bob@{socket.gethostname()}"


def test_the_target_is_flag_then_mesh_state_then_default(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["--state-dir", str(tmp_path), "objective", "show"])
    assert control_target(args) == DEFAULT_TARGET
    (tmp_path / "state.json").write_text(json.dumps({"control_endpoint": "127.0.0.1:6000"}))
    assert control_target(args) == "127.0.0.1:6000"
    flagged = parser.parse_args(
        ["--state-dir", str(tmp_path), "objective", "--target", "h:1", "show"]
    )
    assert control_target(flagged) == "h:1"


def test_a_change_without_a_reason_is_refused_before_any_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["objective", "--target", "127.0.0.1:1", "promote", "x"])
    assert args.handler(args) == 2
    assert "--reason" in capsys.readouterr().err
