"""The run folder rule: a folder that holds a train.py run takes no other run, except that run resumed."""

import pytest

from repblocks.train.run_folder import check_run_folder, run_files


def _a_run(folder):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    (folder / "config.yaml").write_text("model: {name: repvgg_tiny}\ndata: {}\ntrainer: {}\n")
    return folder


def test_what_counts_as_a_run(tmp_path):
    assert run_files(tmp_path) == []
    (tmp_path / "config.yaml").write_text("something: else\n")  # not train.py's config
    (tmp_path / "checkpoints").mkdir()  # empty
    (tmp_path / ".hydra").mkdir()  # Hydra's, written before train() starts
    assert run_files(tmp_path) == []
    check_run_folder(tmp_path, ckpt_path=None)
    (tmp_path / "metrics.json").write_text("{}")
    assert run_files(tmp_path) == ["metrics.json"]
    assert run_files(_a_run(tmp_path / "run")) == ["config.yaml", "checkpoints/"]


def test_only_that_run_resumed_may_write_into_it(tmp_path):
    run = _a_run(tmp_path / "run")
    message = rf"run folder {run} already holds a run \(config.yaml, checkpoints/\): choose another folder"
    with pytest.raises(ValueError, match=message):
        check_run_folder(run, ckpt_path=None)
    elsewhere = _a_run(tmp_path / "other") / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=rf"or continue that run with ckpt_path={run}/checkpoints/last.ckpt"):
        check_run_folder(run, ckpt_path=str(elsewhere))
    check_run_folder(run, ckpt_path=str(run / "checkpoints" / "last.ckpt"))  # continues that run
    check_run_folder(run, ckpt_path=None, new_run=False)  # DDP's other processes join the first one's run


def test_every_folder_the_run_writes_is_checked(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder should be")
    with pytest.raises(ValueError, match=r"run folder .*taken/checkpoints cannot be a folder: .*taken is a file"):
        check_run_folder(tmp_path / "new", ckpt_path=None, subfolders=[tmp_path / "taken" / "checkpoints"])
    assert not (tmp_path / "new").exists()  # nothing created by checking
