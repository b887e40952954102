"""Frame sources: folders (recursive, sorted, non-images skipped and counted), images, videos, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.sources import FolderSource, ImageFileSource, SourceError, VideoSource, frames, open_source
from shared.frames import JPEG_MAGIC, inspect_frame
from tests.support.frames import jpeg_bytes, png_bytes, write_video


def make_folder(root: Path) -> dict[str, bytes]:
    images = {
        "b.jpg": jpeg_bytes(seed=1),
        "a.png": png_bytes(seed=2),
        "sub/c.jpg": jpeg_bytes(seed=3),
        "sub/deeper/d.png": png_bytes(seed=4, channels=1),
    }
    for name, body in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "clip.gif").write_bytes(b"GIF89a....")
    return images


def test_a_folder_yields_every_image_recursively_in_sorted_order_byte_for_byte(tmp_path: Path) -> None:
    images = make_folder(tmp_path)
    source = open_source(str(tmp_path))

    got = list(frames(source))

    assert isinstance(source, FolderSource)
    assert [Path(f.origin).relative_to(tmp_path).as_posix() for f in got] == sorted(images)
    assert [f.body for f in got] == [images[name] for name in sorted(images)]


def test_non_images_in_a_folder_are_skipped_and_counted_once_however_often_it_loops(tmp_path: Path) -> None:
    make_folder(tmp_path)
    source = open_source(str(tmp_path))

    got = [frame for _, frame in zip(range(10), frames(source, loop=True), strict=False)]

    assert len(got) == 10
    assert source.skipped == 2


def test_an_empty_folder_ends_even_with_loop(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("nothing to see")
    source = open_source(str(tmp_path))

    assert list(frames(source, loop=True)) == []
    assert source.skipped == 1


def test_a_video_file_yields_each_frame_as_a_jpeg(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=6, width=80, height=60)
    source = open_source(str(video), jpeg_quality=80)

    got = list(frames(source))

    assert isinstance(source, VideoSource)
    assert len(got) == 6
    assert all(f.body.startswith(JPEG_MAGIC) for f in got)
    assert {(inspect_frame(f.body).width, inspect_frame(f.body).height) for f in got} == {(80, 60)}
    assert got[0].origin.endswith("clip.avi#0")
    assert got[5].origin.endswith("clip.avi#5")
    assert len({f.body for f in got}) == 6


def test_a_looping_video_starts_again_from_its_first_frame(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=3)
    source = open_source(str(video))

    got = [f.origin.rsplit("#", 1)[1] for _, f in zip(range(7), frames(source, loop=True), strict=False)]

    assert got == ["0", "1", "2", "0", "1", "2", "0"]


def test_a_single_image_is_sent_as_it_is(tmp_path: Path) -> None:
    body = png_bytes(seed=9)
    (tmp_path / "one.png").write_bytes(body)
    source = open_source(str(tmp_path / "one.png"))

    assert isinstance(source, ImageFileSource)
    assert [f.body for f in frames(source)] == [body]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("{tmp}/missing", "no such file or folder"),
        ("{tmp}/notes.txt", "OpenCV cannot open it"),
        ("ftp://camera.local/stream", "unsupported URL scheme 'ftp'"),
    ],
)
def test_an_unreadable_source_raises_one_line_naming_it(tmp_path: Path, spec: str, reason: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    target = spec.format(tmp=tmp_path)

    with pytest.raises(SourceError, match=reason) as raised:
        open_source(target)
    assert target in str(raised.value)
    assert "\n" not in str(raised.value)


def test_folder_keys_name_each_file_by_its_path_and_content_whenever_it_is_read(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "twin.jpg").write_bytes((tmp_path / "b.jpg").read_bytes())

    first = [f.key for f in frames(open_source(str(tmp_path)))]
    again = [f.key for f in frames(open_source(str(tmp_path)))]

    assert first == again
    assert len(set(first)) == len(first) == 5
    (tmp_path / "b.jpg").write_bytes(jpeg_bytes(seed=99))
    changed = [f.key for f in frames(open_source(str(tmp_path)))]
    assert [k for k in changed if k not in first] == [k for k in changed if k.startswith("file:b.jpg:")]


def test_video_keys_name_the_file_and_the_frame_index_on_every_pass(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", frames=3)
    source = open_source(str(video))

    keys = [f.key for _, f in zip(range(6), frames(source, loop=True), strict=False)]

    assert keys[:3] == keys[3:]
    assert len(set(keys)) == 3
    assert keys[0].endswith("#0")
    other = write_video(tmp_path / "other.avi", frames=3, width=80, height=60)
    assert not {f.key for f in frames(open_source(str(other)))} & set(keys)
