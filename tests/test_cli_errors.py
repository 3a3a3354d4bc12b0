"""User errors print one line without a traceback; --debug (or MEMCURVE_DEBUG=1) shows it; files get the
permissions Lightning's files get; a canary block too short to hold a canary is refused."""

from __future__ import annotations

import os
import stat

import pytest

from memcurve.cli import main
from memcurve.data import CanaryTextDataModule
from memcurve.utils.files import atomic_write


def test_a_user_error_is_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEMCURVE_DEBUG", raising=False)
    target = tmp_path / "new.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--source", str(tmp_path / "missing.ckpt"), "--output", str(target), "--layers", "[fc]",
              "--method", "svd", "--energy", "0.5"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memcurve edit: error:"), err
    assert "Traceback" not in err[0] and "missing.ckpt" in err[0]
    assert not target.exists()


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    args = ["edit", "--source", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "o.ckpt"),
            "--layers", "[fc]", "--method", "svd", "--energy", "0.5"]  # fmt: skip
    if how == "flag":
        args.append("--debug")
    else:
        monkeypatch.setenv("MEMCURVE_DEBUG", "1")
    with pytest.raises((FileNotFoundError, OSError)):
        main(args)


def test_a_bad_run_config_path_fails_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEMCURVE_DEBUG", raising=False)
    config = tmp_path / "run.yaml"
    # A model class that cannot be built: the path check must come first.
    config.write_text("model:\n  class_path: torch.nn.Identity\n")
    with pytest.raises(SystemExit):
        main(["prune", "--config", str(config), "--ckpt_path", str(tmp_path / "nope.ckpt"), "--method", "[svd]",
              "--layers", "[x]", "--energy", "[0.5]"])  # fmt: skip
    assert "--ckpt_path" in capsys.readouterr().err


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "report.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as open(..., "w") and Lightning's checkpoints, not 0o600


def test_a_block_too_short_for_a_canary_is_refused():
    with pytest.raises(ValueError, match=r"block_size=16 is shorter than EOS \+ prefix_length \+ suffix_length = 21"):
        CanaryTextDataModule(block_size=16, prefix_length=8, suffix_length=12)


def test_generated_blocks_replace_only_what_stands_between_their_markers(tmp_path):
    from memcurve.utils.files import replace_between_markers

    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- b -->\nold\n<!-- e -->\nkept\n")
    replace_between_markers(readme, "<!-- b -->", "<!-- e -->", "new")
    assert readme.read_text() == "# title\n<!-- b -->\nnew\n<!-- e -->\nkept\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match=r"no <!-- b --> \.\.\. <!-- e --> markers"):
        replace_between_markers(readme, "<!-- b -->", "<!-- e -->", "new")
    assert readme.read_text() == "no markers\n"
