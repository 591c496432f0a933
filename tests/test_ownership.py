"""The one atomic publish every writer uses: `atomic_path` / `replace_path` (user outputs, assets, the data cache)."""

from __future__ import annotations

import json

import pytest

from zhjax.data.files import Cache
from zhjax.ownership import atomic_path, replace_path


def test_a_failed_block_leaves_the_old_content_and_no_partial(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_finished_block_replaces_a_folder_or_a_file_whole(tmp_path):
    folder, file = tmp_path / "dir", tmp_path / "f.bin"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    file.write_bytes(b"old")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    with atomic_path(file) as tmp:
        tmp.write_bytes(b"new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"]
    assert file.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f.bin"]


def test_keep_existing_keeps_the_first_writers_copy(tmp_path):
    final, late = tmp_path / "entry", tmp_path / ".late"
    final.mkdir()
    (final / "meta.json").write_text("first")
    late.mkdir()
    (late / "meta.json").write_text("second")
    assert replace_path(late, final, keep_existing=True) is False
    assert (final / "meta.json").read_text() == "first" and not late.exists()


def test_the_data_cache_replaces_a_stale_entry_and_keeps_a_complete_one(tmp_path):
    cache = Cache(tmp_path / "cache")
    stale = cache.local / "tokens" / "k1"
    stale.mkdir(parents=True)
    (stale / "part.arrow").write_text("half written by a crashed host")  # no meta.json: incomplete
    with cache.staging() as staging:
        (staging / "part.arrow").write_text("whole")
        cache.publish_dir("tokens/k1", [staging / "part.arrow"], {"n": 1})
    assert (stale / "part.arrow").read_text() == "whole" and json.loads((stale / "meta.json").read_text()) == {"n": 1}
    with cache.staging() as staging:  # a second host publishing the same entry later keeps the first one's
        (staging / "part.arrow").write_text("again")
        cache.publish_dir("tokens/k1", [staging / "part.arrow"], {"n": 2})
    assert (stale / "part.arrow").read_text() == "whole" and cache.exists("tokens/k1")
    assert not [p for p in (cache.local / "tokens").iterdir() if p.name.startswith(".")]
