"""In-process tests of triplet_totally_looks_like.py: downloads, zips, output folders."""

import json
import os
import pathlib
import signal
import stat
import zipfile

import helpers
import pytest

import triplet_totally_looks_like as tll
from siamese_support import command_line, downloads, image_folders, run_folder, synthetic

PROG = "triplet_totally_looks_like.py"


def _leftovers(folder):
    return [path.name for path in pathlib.Path(folder).rglob(".tmp-*")]


# ---------------------------------------------------------------------------
# Zip extraction
# ---------------------------------------------------------------------------


def _make_zip(path, members):
    """A zip of `members`: (name, content) or ZipInfo-ready (ZipInfo, content) items."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members:
            archive.writestr(name, content)
    return path


def test_extract_zip_safely_unpacks_the_top_folder(tmp_path):
    zip_path = _make_zip(
        tmp_path / "left.zip",
        [("left/", b""), ("left/00000.jpg", b"a"), ("left/sub/00001.jpg", b"b")],
    )
    folder = downloads.extract_zip_safely(zip_path, tmp_path / "left")
    assert (folder / "00000.jpg").read_bytes() == b"a"
    assert (folder / "sub" / "00001.jpg").read_bytes() == b"b"
    assert not _leftovers(tmp_path)


def test_extract_zip_safely_without_top_folder(tmp_path):
    zip_path = _make_zip(tmp_path / "right.zip", [("00000.jpg", b"a"), ("00001.jpg", b"b")])
    folder = downloads.extract_zip_safely(zip_path, tmp_path / "right")
    assert sorted(path.name for path in folder.iterdir()) == ["00000.jpg", "00001.jpg"]


def _symlink_member(name, target):
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so the mode bits below are read
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


@pytest.mark.parametrize(
    "member, reason",
    [
        ("../evil.txt", "'..'"),
        ("left/../../evil.txt", "'..'"),
        ("/tmp/evil.txt", "absolute path"),
        ("C:/evil.txt", "absolute path"),
        ("left\\..\\..\\evil.txt", "'..'"),
        ("symlink", "symbolic link"),
    ],
)
def test_crafted_zip_is_rejected_before_anything_is_written(tmp_path, member, reason):
    zip_path = tmp_path / "work" / "left.zip"
    zip_path.parent.mkdir()
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("left/00000.jpg", b"fine")
        if member == "symlink":
            info, target = _symlink_member("left/link.jpg", b"/etc/passwd")
            archive.writestr(info, target)
        else:
            archive.writestr(member, b"evil")
    with pytest.raises(ValueError, match=f"refusing to extract member .*{reason}"):
        downloads.extract_zip_safely(zip_path, zip_path.parent / "left")
    assert sorted(path.name for path in zip_path.parent.iterdir()) == ["left.zip"]
    assert not list(tmp_path.rglob("evil.txt"))


def test_corrupt_and_non_zip_files_are_rejected(tmp_path):
    zip_path = tmp_path / "left.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("left/00000.jpg", b"A" * 1000)
    content = bytearray(zip_path.read_bytes())
    position = content.index(b"A" * 1000)
    content[position + 10] = ord("B")  # breaks the member's CRC
    zip_path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match="corrupt"):
        downloads.extract_zip_safely(zip_path, tmp_path / "left")
    (tmp_path / "right.zip").write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(ValueError, match="not a valid zip file"):
        downloads.extract_zip_safely(tmp_path / "right.zip", tmp_path / "right")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["left.zip", "right.zip"]


# ---------------------------------------------------------------------------
# Downloads, through main(), with the network simulated
# ---------------------------------------------------------------------------


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "keras_cache"
    monkeypatch.setattr(tll, "cache_dir", cache)
    return cache


def test_dataset_download_failure_is_one_line_naming_the_offline_options(
    tmp_path, offline_cache, monkeypatch, capsys
):
    import gdown

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(gdown, "download", offline)
    result = helpers.run_main(tll, ["--output-dir", tmp_path / "out"], tmp_path, capsys)
    line = helpers.assert_one_line_error(result, PROG, "--data-dir", "--dry-run")
    assert line.startswith(f"{PROG}: error: could not download left.zip"), line
    assert result.stdout.splitlines()[0].startswith("Backend: tensorflow. Device: ")
    # Nothing half-downloaded is left to be mistaken for the real file.
    assert sorted(path.name for path in offline_cache.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_gdown_returning_nothing_is_a_download_error(tmp_path, offline_cache, monkeypatch):
    import gdown

    monkeypatch.setattr(gdown, "download", lambda *args, **kwargs: None)
    offline_cache.mkdir()
    with pytest.raises(command_line.DownloadError, match="--data-dir"):
        downloads.download_from_google_drive("some-id", offline_cache / "left.zip")
    assert list(offline_cache.iterdir()) == []


def test_downloaded_crafted_zip_stops_the_run(tmp_path, offline_cache, monkeypatch, capsys):
    import gdown

    def serve_crafted_zip(id, output, quiet):
        _make_zip(pathlib.Path(output), [("left/00000.jpg", b"x"), ("../../escape.txt", b"x")])
        return output

    monkeypatch.setattr(gdown, "download", serve_crafted_zip)
    result = helpers.run_main(tll, ["--output-dir", tmp_path / "out"], tmp_path, capsys)
    helpers.assert_one_line_error(result, PROG, "refusing to extract member '../../escape.txt'")
    assert not list(tmp_path.rglob("escape.txt"))
    # The complete zip was kept, but no folder was extracted from it.
    assert sorted(path.name for path in offline_cache.iterdir()) == ["left.zip"]


def test_downloaded_zips_are_extracted_once_and_counted(tmp_path, offline_cache, monkeypatch):
    import gdown

    calls = []

    def serve(id, output, quiet):
        calls.append(id)
        side = "left" if id == tll.google_drive_ids["left"] else "right"
        _make_zip(pathlib.Path(output), [(f"{side}/{n:05d}.jpg", b"x") for n in range(3)])
        return output

    monkeypatch.setattr(gdown, "download", serve)
    folder = downloads.download_dataset(tll.cache_dir, tll.google_drive_ids)
    assert folder == offline_cache
    anchors, positives = image_folders.find_image_pairs(folder)
    assert len(anchors) == len(positives) == 3
    # A second call finds the folders and downloads nothing.
    downloads.download_dataset(tll.cache_dir, tll.google_drive_ids)
    assert len(calls) == 2
    assert not _leftovers(offline_cache)


# ---------------------------------------------------------------------------
# Output folder rules and atomic files
# ---------------------------------------------------------------------------


def prepare(output_dir, **options):
    """The script's output-folder rules: `run_folder.prepare_output_dir` with its outputs."""
    return run_folder.prepare_output_dir(
        output_dir, outputs=command_line.TRIPLET_OUTPUT_FILES, **options
    )


def test_prepare_output_dir_rules(tmp_path):
    output_dir = tmp_path / "run"
    assert prepare(output_dir) == output_dir
    (output_dir / "metrics.json").write_text(json.dumps({"dry_run": False}))
    (output_dir / "loss.png").write_bytes(b"old")
    (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds a finished run.*--overwrite"):
        prepare(output_dir)
    with pytest.raises(ValueError, match="already holds a finished run"):
        prepare(output_dir, dry_run=True)
    prepare(output_dir, overwrite=True)
    assert sorted(path.name for path in output_dir.iterdir()) == ["notes.txt"]

    (output_dir / "backup").mkdir()
    with pytest.raises(ValueError, match="interrupted run.*--resume.*--overwrite"):
        prepare(output_dir)
    prepare(output_dir, resume=True)
    assert (output_dir / "backup").exists()

    # A dry run may replace an earlier dry run.
    dry_dir = tmp_path / "dry"
    prepare(dry_dir)
    (dry_dir / "metrics.json").write_text(json.dumps({"dry_run": True}))
    prepare(dry_dir, dry_run=True)
    assert not (dry_dir / "metrics.json").exists()


def test_prepare_output_dir_refuses_files_and_unwritable_places(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        prepare(tmp_path / "file")
    with pytest.raises(ValueError, match="cannot be written"):
        prepare(tmp_path / "file" / "below")


def test_atomic_writes_keep_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    run_folder.write_json({"a": 1}, path)
    with pytest.raises(RuntimeError):
        with run_folder.atomic_path(path) as temporary:
            pathlib.Path(temporary).write_text("half")
            raise RuntimeError("crash midway")
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    run_folder.write_csv([{"epoch": 0, "loss": 1.5}], tmp_path / "h.csv", ["epoch", "loss"])
    assert (tmp_path / "h.csv").read_text().splitlines() == ["epoch,loss", "0,1.5"]


def test_resume_refuses_a_different_split(tmp_path, capsys):
    pairs = synthetic.make_synthetic_dataset(tmp_path / "pairs", pairs=10, image_size=32, seed=1)
    output_dir = tmp_path / "out"
    arguments = ["--data-dir", pairs, "--weights", "none", "--image-size", "32"]
    arguments += ["--batch-size", "4", "--no-plots", "--resume", "--output-dir", output_dir]
    output_dir.mkdir()
    split = {"train": ["00000.jpg", "00001.jpg"], "validation": ["00002.jpg", "00003.jpg"]}
    (output_dir / "split.json").write_text(json.dumps(split))
    (output_dir / "backup").mkdir()
    result = helpers.run_main(tll, arguments, tmp_path, capsys)
    assert result.returncode == 2, helpers.describe(result)
    assert result.stderr == (
        f"{PROG}: error: the pairs or their split differ from those of "
        f"the interrupted run in {output_dir} (data, --limit, --validation-split or --seed "
        "changed); rerun its exact command with --resume, or pass --overwrite to start over\n"
    )
    assert json.loads((output_dir / "split.json").read_text()) == split
    assert not (output_dir / "settings.json").exists()


def test_a_split_is_compared_only_with_an_interrupted_runs(tmp_path):
    # The rule the script relies on: without a backup there is nothing to continue, and
    # any split is fine (and recorded); with one, the same split passes.
    split = {"train": ["00000.jpg", "00001.jpg"], "validation": ["00002.jpg", "00003.jpg"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    other = {"train": [], "validation": []}
    run_folder.check_same_as_interrupted_run(tmp_path, "split.json", other, str)
    assert json.loads((tmp_path / "split.json").read_text()) == other
    (tmp_path / "backup").mkdir()
    run_folder.check_same_as_interrupted_run(tmp_path, "split.json", other, str)
    with pytest.raises(ValueError, match="changed.*--overwrite"):
        run_folder.check_same_as_interrupted_run(tmp_path, "split.json", split, lambda _: "changed")


def test_ctrl_c_during_a_backup_is_delivered_after_it(ctrl_c_raises):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with run_folder.ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            finished.append("save completed")
    assert finished == ["save completed"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
