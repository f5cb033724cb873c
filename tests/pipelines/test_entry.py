"""The console entry point: the pipeline extra check and what it does once the command is over."""

from __future__ import annotations

import gc

import pytest

import pipelines.cli
from pipelines import entry


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ending", [SystemExit(0), SystemExit(2), RuntimeError("boom")])
def test_the_heap_is_frozen_once_the_command_ends_however_it_ends(monkeypatch, ending):
    """The interpreter's last collection skips frozen objects (about 0.3 s of a `sample` run)."""

    def command():
        raise ending

    monkeypatch.setattr(pipelines.cli, "main", command)
    gc.unfreeze()
    try:
        with pytest.raises(type(ending)):
            entry.main()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the test session goes on collecting as before


@pytest.mark.timeout(30)
def test_a_missing_pipeline_library_exits_2_naming_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(entry, "missing", lambda: ["ray"])
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 2
    assert "pip install 'ddpm-pipe[pipeline]'" in capsys.readouterr().err
