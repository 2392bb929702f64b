"""The qft_ds command line."""
from qft_ds.cli import main


def test_report_lists_backends(capsys):
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "auto" in out
