"""Atomic writes keep normal permissions and never leave half a file; unwritable outputs fail early."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from muonprof._files import OutputPathError, atomic_write, check_writable


def test_atomic_write_permissions_and_cleanup(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = atomic_write(tmp_path / "a" / "out.bin", lambda fh: fh.write(b"one"))
        assert target.read_bytes() == b"one" and (target.stat().st_mode & 0o777) == 0o644
        target.chmod(0o600)
        atomic_write(target, lambda fh: fh.write(b"two"))
        assert target.read_bytes() == b"two" and (target.stat().st_mode & 0o777) == 0o600  # the old mode stays

        def boom(fh: object) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            atomic_write(target, boom)
        assert target.read_bytes() == b"two" and not list(target.parent.glob(".*.tmp"))
    finally:
        os.umask(old)


def test_check_writable(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "new" / "x.json") == tmp_path / "new" / "x.json"
    with pytest.raises(OutputPathError, match="is a directory"):
        check_writable(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="cannot create folder"):
        check_writable(tmp_path / "file" / "x.json")


def test_umask_is_read_without_changing_it_and_the_folder_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from muonprof import _files

    old = os.umask(0o027)
    try:
        calls: list[int] = []
        real_umask = os.umask
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
        synced: list[int] = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
        target = atomic_write(tmp_path / "x.bin", lambda fh: fh.write(b"x"))
        assert (target.stat().st_mode & 0o777) == 0o640
        if Path("/proc/self/status").exists():
            assert calls == []  # read from /proc: no other thread ever sees a zero umask
        assert len(synced) == 2  # the file, then its folder
        assert _files._umask() == 0o027
    finally:
        os.umask(old)
