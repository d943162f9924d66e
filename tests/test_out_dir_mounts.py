"""--out on a mount point (a Docker volume), a read-only folder, or an empty path.

A mount point cannot be renamed (EBUSY), so atomic_dir fills an empty one in place and check_out_dir
refuses, before any work, what cannot be written.  Real bind mounts need root (CAP_SYS_ADMIN); those
tests skip with the reason elsewhere, and the same logic is covered through a patched os.path.ismount.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

from cg4ctr_fast import fileio
from cg4ctr_fast.cli.main import main
from cg4ctr_fast.errors import InputError
from cg4ctr_fast.fileio import atomic_dir, check_out_dir, is_mount_point
from tests.conftest import make_product
from tests.test_imaging import assert_one_line_error


@contextlib.contextmanager
def bind_mount(source: Path, target: Path, *, read_only: bool = False):
    """Bind-mount source on target for the block; skips the test when mounting is not permitted."""
    result = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"bind mount not permitted here: {result.stderr.strip() or result.returncode}")
    try:
        if read_only:
            result = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"read-only remount not permitted here: {result.stderr.strip()}")
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def _fake_mount(monkeypatch, target: Path) -> None:
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) == os.path.realpath(target) or real(p))


def _fill(work: Path) -> None:
    (work / "creatives.json").write_text("{}")
    (work / "sub").mkdir()
    (work / "sub" / "a.png").write_bytes(b"png")


def _check_filled(final: Path) -> None:
    assert sorted(p.name for p in final.iterdir()) == ["creatives.json", "sub"]  # no temporary folder left
    assert (final / "sub" / "a.png").read_bytes() == b"png"


# --------------------------------------------------------------------------------------------
# empty path, read-only folder


@pytest.mark.parametrize("value", ["", Path("")], ids=["str", "path"])
def test_check_out_dir_refuses_empty_path(value):
    with pytest.raises(InputError) as excinfo:
        check_out_dir(value)  # Path("") would be the working folder
    assert_one_line_error(excinfo, "--out", "empty")


def test_cli_refuses_empty_out(capsys, tmp_path):
    image, mask = make_product(16, 16, seed=1)
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    code = main(["generate", "--image", str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png"),
                 "--prompt", "x", "--steps", "2", "--out", "", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "empty" in err and len(err.strip().splitlines()) == 1, err


def test_check_out_dir_refuses_unwritable_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out else real(p, mode, **kw))
    with pytest.raises(InputError) as excinfo:
        check_out_dir(out)
    assert_one_line_error(excinfo, str(out), "cannot be written")


def test_read_only_mount_refused_up_front(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    image, mask = make_product(16, 16, seed=1)
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    with bind_mount(src, out, read_only=True):
        with pytest.raises(InputError) as excinfo:
            check_out_dir(out)
        assert_one_line_error(excinfo, str(out), "read-only")
        code = main(["generate", "--image", str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png"),
                     "--prompt", "x", "--steps", "2", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "internal error" not in err, err


# --------------------------------------------------------------------------------------------
# mount points: real bind mounts


def test_is_mount_point_sees_same_filesystem_bind_mount(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    assert not is_mount_point(out)
    with bind_mount(src, out):
        assert not os.path.ismount(out)  # why mountinfo is read: same st_dev, so ismount misses it
        assert is_mount_point(out)


def test_atomic_dir_fills_empty_bind_mount(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    with bind_mount(src, out):
        assert check_out_dir(out) == out
        with atomic_dir(out) as work:
            work = Path(work)
            assert work.parent == out  # inside the mount: same file system, so the renames work
            _fill(work)
            assert not (out / "creatives.json").exists()  # nothing visible until the block succeeds
        _check_filled(out)
    _check_filled(src)


def test_cli_generate_into_empty_bind_mount(tmp_path, capsys):
    """The reported case: `mount --bind a b; cg4ctr generate ... --out b` ended in an internal error."""
    src, out = tmp_path / "a", tmp_path / "b"
    src.mkdir()
    out.mkdir()
    image, mask = make_product(24, 24, seed=2)
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    with bind_mount(src, out):
        code = main(["generate", "--preset", "tiny", "--image", str(tmp_path / "p.png"),
                     "--mask", str(tmp_path / "m.png"), "--prompt", "x", "--steps", "2", "--out", str(out),
                     "--quiet"])
        err = capsys.readouterr().err
        assert code == 0, err
        names = sorted(p.name for p in out.iterdir())
        assert "creatives.json" in names and not [n for n in names if n.startswith(".")], names
        # Non-empty now: --overwrite cannot replace a mount point as a whole, refused before any work.
        code = main(["generate", "--preset", "tiny", "--image", str(tmp_path / "p.png"),
                     "--mask", str(tmp_path / "m.png"), "--prompt", "x", "--steps", "2", "--out", str(out),
                     "--overwrite", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "mount point" in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in out.iterdir()) == names


# --------------------------------------------------------------------------------------------
# mount points: patched os.path.ismount (runs everywhere)


def test_atomic_dir_fills_empty_mount_point_patched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _fake_mount(monkeypatch, out)
    assert check_out_dir(out) == out
    with atomic_dir(out) as work:
        work = Path(work)
        assert work.parent == out and work.name.startswith(".")
        _fill(work)
    _check_filled(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_mount_point_failure_leaves_it_empty(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _fake_mount(monkeypatch, out)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as work:
            _fill(Path(work))
            raise RuntimeError("boom")
    assert list(out.iterdir()) == []


def test_atomic_dir_mount_point_move_failure_leaves_it_empty(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _fake_mount(monkeypatch, out)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the second entry: the first is already up and must go back
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return real_rename(src, dst)

    with pytest.raises(InputError) as excinfo:
        with atomic_dir(out) as work:
            _fill(Path(work))
            monkeypatch.setattr(os, "rename", rename)
    assert_one_line_error(excinfo, str(out), os.strerror(errno.EPERM))
    monkeypatch.setattr(os, "rename", real_rename)
    assert list(out.iterdir()) == []


def test_non_empty_mount_point_refused(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _fake_mount(monkeypatch, out)
    with pytest.raises(InputError) as excinfo:
        check_out_dir(out, overwrite=True)
    assert_one_line_error(excinfo, str(out), "mount point", "not empty")
    with pytest.raises(InputError) as excinfo:
        with atomic_dir(out):
            pytest.fail("body must not run")
    assert_one_line_error(excinfo, str(out), "mount point")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_mount_point_check_does_not_need_parent_writable(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _fake_mount(monkeypatch, out)
    # An empty mount point is filled in place; its parent (often "/" in a container) may be read-only.
    monkeypatch.setattr(fileio, "_check_writable_parent",
                        lambda *a: pytest.fail("parent probed for a mount point"))
    assert check_out_dir(out) == out
