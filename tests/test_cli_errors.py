"""`qft_ds export` / `consolidate`: an OSError writing OUT_DIR (read-only path, full disk, a file in the way) is one
line on stderr and exit status 2, not a traceback (issue 18, item 10); nothing is left behind."""
import errno

import pytest

from qft_ds.cli import main
from test_export import trained  # noqa: F401 - the fixture: a tiny trained checkpoint


def test_out_dir_under_a_file_is_one_line(trained, tmp_path, capsys):  # noqa: F811
    _, ckpt = trained
    (tmp_path / "a_file").write_text("x")
    assert main(["export", str(ckpt), str(tmp_path / "a_file" / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qft_ds export: ") and str(tmp_path / "a_file") in err and "\n" not in err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_write_that_fails_is_one_line_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch, code):  # noqa: F811
    """Root ignores a read-only mode, so the failing write is simulated where the export writes its weights."""
    import os

    from qft_ds import export
    _, ckpt = trained

    def failing_save(*args, **kwargs):
        raise OSError(code, os.strerror(code), args[1])
    monkeypatch.setattr(export, "save_file", failing_save)
    out = tmp_path / "exports" / "out"
    assert main(["export", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qft_ds export: ") and os.strerror(code) in err and "\n" not in err
    assert not out.exists() and list(out.parent.iterdir()) == []  # the temp folder went too
