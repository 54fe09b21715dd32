"""`triplet_totally_looks_like.py search` and `compare` on a dry run's model, and `--resume`
on that finished run.

The model is trained once per module on generated pairs (`tools/make_synthetic_tll.py`),
whose images then serve as the gallery and the queries. A first search and one bad input
run in subprocesses, as a user meets them; the other commands call `main()` in this
process, which returns the exit code the script exits with (a subprocess pays the
TensorFlow import before the model's loading, 5 s or more). The gallery's cache lives in
the run folder, not in the process, so searches in one process find what another left.
"""

import os
import pathlib
import re
import shutil

import helpers
import pytest
from helpers import TOOLS, TRIPLET, describe

# Imported here, before any test: the first import sets process-wide settings (environment
# variables of TensorFlow's) that conftest.py's guard would blame on the test.
import triplet_totally_looks_like

# Every test needs the model the module trains first: all are in the slow lane.
pytestmark = pytest.mark.slow
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROG = "triplet_totally_looks_like.py search"
# The module's run: one epoch, no pretrained weights, the dry run's 64 x 64 images.
DRY_RUN = ["--dry-run", "--no-plots", "--batch-size", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`(folder, run_dir, images)`: a dry run's folder and the 24 images it trained on."""
    folder = tmp_path_factory.mktemp("search")
    tool = helpers.run(
        TOOLS / "make_synthetic_tll.py", ["--pairs", 12, "--image-size", 64, "pairs"], folder
    )
    assert tool.returncode == 0, describe(tool)
    result = helpers.run(TRIPLET, [*DRY_RUN, "--data-dir", "pairs", "--output-dir", "run"], folder)
    assert result.returncode == 0, describe(result)
    return folder, folder / "run", folder / "pairs"


def ranking(stdout):
    """`[(path, squared distance, cosine similarity)]` as `search` prints them, in order."""
    rows = re.findall(r"^\s+\d+\.\s+([\d.]+)\s+([+-][\d.]+)\s+(.+)$", stdout, re.M)
    return [(pathlib.Path(path), float(distance), float(cosine)) for distance, cosine, path in rows]


def counts(stdout):
    """`(embedded, from the cache)` from the gallery line of `search`."""
    found = re.search(r"([\d,]+) embedded and ([\d,]+) from the cache", stdout)
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def test_search_ranks_the_query_first_and_keeps_the_gallery_between_searches(
    trained, tmp_path, capfd
):
    folder, run_dir, pairs = trained
    tll = triplet_totally_looks_like
    gallery = tmp_path / "gallery"
    shutil.copytree(pairs, gallery)
    query = gallery / "left" / "00003.jpg"
    output = tmp_path / "found.png"
    args = ["search", query, "--gallery", gallery, "-k", "3", "--run-dir", run_dir]
    first = helpers.run(TRIPLET, [*args, "--output", output], folder)
    assert first.returncode == 0, describe(first)
    assert counts(first.stdout) == (24, 0)
    found = ranking(first.stdout)
    assert len(found) == 3
    assert found[0][0] == query and found[0][1] < 1e-3 and found[0][2] > 0.999
    assert [row[1] for row in found] == sorted(row[1] for row in found)
    assert output.read_bytes().startswith(PNG_SIGNATURE)

    again = helpers.run_main(tll, args, folder, capfd)
    assert again.returncode == 0, describe(again)
    assert counts(again.stdout) == (0, 24)
    assert ranking(again.stdout) == found
    assert (run_dir / "search.png").read_bytes().startswith(PNG_SIGNATURE)

    # A gallery file replaced by a copy of the query: only it is embedded again, and it is
    # found at distance 0, which a stale cached embedding would not give.
    changed = gallery / "right" / "00007.jpg"
    shutil.copyfile(query, changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    rebuilt = helpers.run_main(tll, args, folder, capfd)
    assert rebuilt.returncode == 0, describe(rebuilt)
    assert counts(rebuilt.stdout) == (1, 23)
    assert {row[0] for row in ranking(rebuilt.stdout)[:2]} == {query, changed}
    assert ranking(rebuilt.stdout)[1][1] < 1e-3

    # A new model file: every image is embedded again.
    model = run_dir / "embedding.keras"
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    new_model = helpers.run_main(tll, args, folder, capfd)
    assert new_model.returncode == 0, describe(new_model)
    assert counts(new_model.stdout) == (24, 0)


def test_compare_gives_distance_zero_for_one_image_and_more_for_two(trained, capfd):
    folder, run_dir, pairs = trained
    tll = triplet_totally_looks_like
    image = pairs / "left" / "00001.jpg"
    same = helpers.run_main(tll, ["compare", image, image, "--run-dir", run_dir], folder, capfd)
    assert same.returncode == 0, describe(same)
    assert re.search(r"^Squared distance: 0\.0000$", same.stdout, re.M), same.stdout
    assert re.search(r"^Cosine similarity: \+1\.0000$", same.stdout, re.M), same.stdout
    other_image = pairs / "left" / "00002.jpg"
    other = helpers.run_main(
        tll, ["compare", image, other_image, "--run-dir", run_dir], folder, capfd
    )
    assert other.returncode == 0, describe(other)
    assert float(re.search(r"^Squared distance: ([\d.]+)$", other.stdout, re.M)[1]) > 1e-3


@pytest.mark.parametrize(
    "case",
    [
        "empty gallery",
        "no gallery",
        "k too large",
        "missing query",
        "unreadable query",
        "no run folder",
        "other script's model",
    ],
)
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, case, capsys):
    folder, run_dir, pairs = trained
    query = pairs / "left" / "00001.jpg"
    args = ["search", query, "--gallery", pairs / "left", "--run-dir", run_dir]
    if case == "empty gallery":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        args[3], hints = tmp_path / "empty", ("holds no images",)
    elif case == "no gallery":
        args[3], hints = tmp_path / "nowhere", ("no such folder",)
    elif case == "k too large":
        args, hints = [*args, "-k", "13"], ("-k 13 is more than the 12 images",)
    elif case == "missing query":
        args[1], hints = tmp_path / "gone.jpg", ("gone.jpg: no such image file",)
    elif case == "unreadable query":
        (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
        args[1], hints = tmp_path / "broken.jpg", ("broken.jpg: not an image",)
    elif case == "no run folder":
        args[-1], hints = tmp_path / "nowhere", ("no run folder", "train a model first")
    else:
        (tmp_path / "embedding_network.keras").write_bytes(b"")
        args[-1], hints = tmp_path, ("a model of mnist_siamese.py",)
    # One case as a user meets it, in its own process (the JPEG library's own complaint must
    # not reach its stderr); the others through main().
    in_own_process = case == "unreadable query"
    result = (
        helpers.run(TRIPLET, args, folder)
        if in_own_process
        else helpers.run_main(triplet_totally_looks_like, args, folder, capsys)
    )
    helpers.assert_one_line_error(result, PROG, *hints)


def test_search_output_into_a_new_folder_is_created(trained, tmp_path, capfd):
    _, run_dir, pairs = trained
    query = pairs / "left" / "00004.jpg"
    output = tmp_path / "not" / "yet" / "here.png"
    search = ["search", query, "--gallery", pairs / "right", "-k", "3", "--run-dir", run_dir]
    tll = triplet_totally_looks_like
    result = helpers.run_main(tll, [*search, "--output", output], tmp_path, capfd)
    assert result.returncode == 0, describe(result)
    assert output.read_bytes().startswith(PNG_SIGNATURE)
    assert [path.name for path in output.parent.iterdir()] == ["here.png"]
    (tmp_path / "a_file").write_text("")
    refused = [*search, "--output", tmp_path / "a_file" / "x.png"]
    result = helpers.run_main(tll, refused, tmp_path, capfd)
    helpers.assert_one_line_error(result, PROG, "a_file is a file")
    assert "Gallery" not in result.stdout  # refused before the gallery was embedded


def test_resume_on_a_finished_triplet_run(trained, tmp_path, capfd):
    # A copy of the module's finished run, resumed with the command that made it (a
    # scheduler's retry): nothing to do, success, the run as it was.
    _, run_dir, pairs = trained
    shutil.copytree(run_dir, tmp_path / "run")
    metrics = (tmp_path / "run" / "metrics.json").read_bytes()
    args = [*DRY_RUN, "--data-dir", pairs, "--output-dir", "run", "--resume"]
    again = helpers.run_main(triplet_totally_looks_like, args, tmp_path, capfd)
    assert again.returncode == 0, describe(again)
    assert "nothing to resume: the run in run finished, after 1 epoch" in again.stdout
    assert (tmp_path / "run" / "metrics.json").read_bytes() == metrics
