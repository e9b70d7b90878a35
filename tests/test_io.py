"""advvit.io: whole-file writes and the clean-up of what killed writes leave."""
import json
import os
import stat

import pytest

from advvit import io


def test_atomic_write_replaces_the_file_and_creates_its_folder(tmp_path):
    path = tmp_path / "a" / "b" / "report.json"
    io.atomic_write_json(path, {"x": 1})
    io.atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert sorted(os.listdir(path.parent)) == ["report.json"]  # no temporary file left


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "args.yaml"
    io.atomic_write_text(path, "old\n")

    def fail(fh):
        fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_write(path, fail, binary=False)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["args.yaml"]


def test_written_files_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write_text(tmp_path / "r.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.md").stat().st_mode) == 0o644


def test_remove_stale_tmp_removes_only_the_temporary_files_of_atomic_writes(tmp_path):
    keep = ["last.pth", "notes.tmp", ".hidden", "summary.csv"]
    for name in keep:
        (tmp_path / name).write_text("x")
    stale = tmp_path / ".last.pth.abc123.tmp"  # the name atomic_write gives its temporary file
    stale.write_text("partial")
    (tmp_path / ".tb.dir.tmp").mkdir()          # a folder is never removed
    removed = io.remove_stale_tmp(tmp_path)
    assert removed == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [".tb.dir.tmp"])
    assert io.remove_stale_tmp(tmp_path / "missing") == []


def test_the_source_commit_is_heads_and_says_when_the_code_differs(tmp_path):
    import subprocess
    from advvit.report import checkout_commit
    repo = tmp_path / "repo"
    (repo / "advvit").mkdir(parents=True)
    (repo / "advvit" / "a.py").write_text("x = 1\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c",
                               "user.email=t@t", *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    assert checkout_commit(repo) is None  # not a checkout yet
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert checkout_commit(repo) == head
    (repo / "notes.txt").write_text("untracked, outside the package\n")
    assert checkout_commit(repo) == head
    (repo / "advvit" / "a.py").write_text("x = 2\n")
    assert checkout_commit(repo) == head + "+dirty"
    # A folder inside somebody else's checkout is not advvit's own.
    assert checkout_commit(repo / "advvit") is None
