"""repblocks.files: atomic files and staged folders, on a disk that fills up and after a kill."""

from pathlib import Path

import pytest

from repblocks.files import DiskFullError, atomic_path, staged_folder, umask
from tests.helpers import small_disk


def test_a_file_that_fills_the_disk_is_one_line_and_nothing_is_left(tmp_path):
    with small_disk(tmp_path / "disk", size="1m") as disk:
        message = rf"^no space left in {disk} while writing big.bin: it needs more than [\d.]+ MB, [\d.]+ MB are free"
        with (
            pytest.raises(DiskFullError, match=message),
            atomic_path(disk / "big.bin") as tmp,
            open(tmp, "wb") as handle,
        ):
            for _ in range(4):
                handle.write(bytes(2**19))
                handle.flush()
        assert list(disk.iterdir()) == []


def test_a_staged_folder_that_fills_the_disk_names_the_folder_and_leaves_nothing(tmp_path):
    with small_disk(tmp_path / "disk", size="1m") as disk:
        message = rf"^no space left in {disk} while writing out: it needs about 3.0 MB"
        with pytest.raises(DiskFullError, match=message), staged_folder(disk / "out", needed=3 * 2**20) as staging:
            (staging / "a.bin").write_bytes(bytes(3 * 2**20))
        assert list(disk.iterdir()) == []


def test_a_staged_folder_replaces_only_what_its_check_allows(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(OSError), staged_folder(out) as staging:  # no replace check: an existing output stays
        (staging / "new.txt").write_text("new")
    assert [path.name for path in tmp_path.iterdir()] == ["out"] and (out / "old.txt").is_file()
    with staged_folder(out, replace=lambda folder: None) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert [path.name for path in out.iterdir()] == ["new.txt"]  # the owner file is not published
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()


def test_staging_folder_records_its_owner_while_it_is_written(tmp_path):
    import os

    with staged_folder(tmp_path / "out") as staging:
        pid = (staging / ".staging-owner").read_text().split()[0]
    assert int(pid) == os.getpid()
    assert not list(Path(tmp_path).glob(".out.*"))


def test_an_atomic_folder_replaces_a_previous_one_whole_and_a_failure_leaves_it(tmp_path):
    package = tmp_path / "model.mlpackage"
    for version in ("first", "second"):
        with atomic_path(package, folder=True) as tmp:
            assert tmp.is_dir() and tmp.name.endswith(".tmp.mlpackage")  # converters check the suffix
            (tmp / "Data").mkdir()
            (tmp / "Data" / "weights.bin").write_text(version)
    assert (package / "Data" / "weights.bin").read_text() == "second"
    with pytest.raises(RuntimeError), atomic_path(package, folder=True) as tmp:
        (tmp / "half").write_text("half a package")
        raise RuntimeError("the check failed")
    assert [path.name for path in tmp_path.iterdir()] == ["model.mlpackage"]  # nothing moved aside or half-written
    assert sorted(path.name for path in package.rglob("*")) == ["Data", "weights.bin"]
