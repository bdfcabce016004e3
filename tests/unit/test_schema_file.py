"""The files an implementer in another language works from stay true to the code.

docs/schema/events.json is what ``relay schema`` prints; ``relay scripts``
hands out exactly the Lua files in relay/wire/lua/ with the SHA1 that EVALSHA
expects. docs/PROTOCOL.md points to both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from relay.config import BudgetConfig
from relay.tools.cli import main
from relay.wire.events import EVENT_TYPES
from relay.wire.schema import schema_text

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "schema" / "events.json"
LUA_DIR = ROOT / "relay" / "wire" / "lua"


def test_committed_schema_is_up_to_date_with_the_models() -> None:
    assert SCHEMA_FILE.read_text("utf-8") == schema_text(), (
        "docs/schema/events.json is out of date: run "
        "`relay schema --out docs/schema/events.json` and commit it"
    )


def test_schema_names_every_event_type() -> None:
    schema = json.loads(SCHEMA_FILE.read_text("utf-8"))
    mapping = schema["event"]["discriminator"]["mapping"]
    assert set(mapping) == EVENT_TYPES


def test_schema_out_writes_what_schema_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    target = tmp_path / "events.json"
    assert main(["schema", "--out", str(target)]) == 0
    assert target.read_text("utf-8") == printed == schema_text()


def test_schema_out_to_an_unwritable_path_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "events.json"
    assert main(["schema", "--out", str(target)]) == 2
    assert f"--out {target}: cannot write" in capsys.readouterr().err


def test_scripts_lists_every_file_with_its_evalsha_sha(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scripts"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    on_disk = sorted(LUA_DIR.glob("*.lua"))
    assert [name for name, _ in rows] == [p.name for p in on_disk]
    # The SHA of the file's bytes is the one EVALSHA needs after SCRIPT LOAD.
    assert [sha for _, sha in rows] == [hashlib.sha1(p.read_bytes()).hexdigest() for p in on_disk]


def test_scripts_out_writes_byte_identical_copies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lua"
    assert main(["scripts", "--out", str(out)]) == 0
    written = capsys.readouterr().out.splitlines()
    assert written == [str(out / p.name) for p in sorted(LUA_DIR.glob("*.lua"))]
    for path in LUA_DIR.glob("*.lua"):
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_scripts_prints_one_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scripts", "publish.lua"]) == 0
    assert capsys.readouterr().out.encode() == (LUA_DIR / "publish.lua").read_bytes()
    assert main(["scripts", "nope"]) == 2
    assert "no script 'nope'; the scripts are: budget_add," in capsys.readouterr().err


def test_scripts_out_over_a_file_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["scripts", "--out", str(blocker)]) == 2
    assert f"--out {blocker}: cannot write" in capsys.readouterr().err


def test_warning_threshold_is_a_fraction_as_documented() -> None:
    """docs/PROTOCOL.md: 0 < threshold < 1, and a percentage such as 80 is refused."""
    assert BudgetConfig(warning_threshold=0.8).warning_threshold == 0.8
    for bad in (80, 1, 0):
        with pytest.raises(ValidationError, match="warning_threshold"):
            BudgetConfig(warning_threshold=bad)
