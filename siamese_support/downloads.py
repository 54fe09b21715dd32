"""Downloads, a zip extraction that cannot write outside its folder, pretrained weights.

The tutorial runs `gdown` and `unzip` in a shell cell and lets Keras fetch ImageNet weights.
A script must survive no network, a half-finished download, a crafted archive and a weights
file that does not fit; that care is not the tutorial's subject.
"""

import contextlib
import os
import pathlib
import re
import shutil
import stat
import tempfile
import warnings
import zipfile

from siamese_support.command_line import DownloadError, one_line

# Everything a run without a network needs, in one line: the dataset download fails first,
# and a user who passed only --data-dir would next fail on the ImageNet weights' download.
OFFLINE_HINT = (
    "to run without a network, pass --data-dir DIR --weights none (DIR holding left/ and "
    "right/; --weights PATH instead of none for a local copy of the ImageNet weights), or "
    "--dry-run for a quick check"
)


def download_dataset(destination, google_drive_ids):
    """Download and unpack a dataset's zips from Google Drive once; return its folder.

    `google_drive_ids` maps a folder name to the id of its zip (`{"left": ...}` for
    `left.zip`, unpacked into `destination/left`). Each zip is downloaded to a temporary
    name and renamed when complete, checked, and unpacked member by member into a temporary
    folder that is renamed into place at the end, so an interrupted download or extraction
    is never mistaken for a finished one. Folders already present are used as they are.
    """
    destination = pathlib.Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for side, file_id in google_drive_ids.items():
        folder = destination / side
        if folder.is_dir():
            continue
        zip_path = destination / f"{side}.zip"
        if not zip_path.is_file():
            download_from_google_drive(file_id, zip_path)
        extract_zip_safely(zip_path, folder)
    return destination


def download_from_google_drive(file_id, path):
    """Fetch one Google Drive file with `gdown`, to a temporary name renamed when complete."""
    path = pathlib.Path(path)
    try:
        import gdown
    except ImportError:
        raise DownloadError(
            f"downloading {path.name} needs the gdown package (pip install gdown); {OFFLINE_HINT}"
        ) from None
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(handle)
    try:
        try:
            result = gdown.download(id=file_id, output=temporary, quiet=False)
        except Exception as error:  # gdown raises its own classes and requests' errors
            raise DownloadError(
                f"could not download {path.name} from Google Drive ({one_line(error)}); "
                f"{OFFLINE_HINT}"
            ) from None
        if result is None or os.path.getsize(temporary) == 0:
            raise DownloadError(f"could not download {path.name} from Google Drive; {OFFLINE_HINT}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _member_parts(member):
    """The components of a zip member's path, with either kind of slash."""
    return [part for part in member.filename.replace("\\", "/").split("/") if part not in ("", ".")]


def _unsafe_member_reason(member):
    """Why a zip member must not be extracted, or None when it is a plain file or folder."""
    name = member.filename.replace("\\", "/")
    parts = _member_parts(member)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in parts:
        return "'..' in its path"
    if not parts:
        return "empty name"
    file_type = stat.S_IFMT(member.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        return "symbolic link"
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special file"
    return None


def extract_zip_safely(zip_path, folder):
    """Unpack `zip_path` into `folder` (for `left.zip`, the `left/` inside it).

    The archive is checked first (`ZipFile.testzip`, then every member's path), and
    nothing is written if a member is a link, an absolute path or climbs out with `..`.
    The members go into a temporary folder beside `folder`, which is renamed into place
    only when all are out.
    """
    zip_path, folder = pathlib.Path(zip_path), pathlib.Path(folder)
    redownload = f"delete {zip_path} and run again to download it afresh"
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_path} is not a valid zip file; {redownload}") from None
    with archive:
        try:
            corrupt_member = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ValueError(f"{zip_path} is damaged ({one_line(error)}); {redownload}") from None
        if corrupt_member is not None:
            raise ValueError(f"{zip_path}: member {corrupt_member} is corrupt; {redownload}")
        members = archive.infolist()
        for member in members:
            reason = _unsafe_member_reason(member)
            if reason:
                raise ValueError(
                    f"{zip_path}: refusing to extract member {member.filename!r} ({reason}); "
                    "the archive is not the expected dataset"
                )
        temporary = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
        try:
            # The standard library's extraction keeps every member inside `temporary` and
            # writes no links; the checks above say why an archive is refused, not only skip.
            archive.extractall(temporary)
            # The example's zips hold a top folder named like the zip; use it when present.
            root = temporary / folder.name
            os.rename(root if root.is_dir() else temporary, folder)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return folder


def weights_choice(weights, model):
    """`--weights` as a Keras application takes it: "imagenet", None (for "none") or a file.

    A path that names no file is refused here, before anything else runs. `model` names the
    application in the message (e.g. "ResNet50").
    """
    if weights is None or weights == "none":
        return None
    if weights != "imagenet" and not pathlib.Path(weights).is_file():
        raise ValueError(
            f"--weights {weights}: no such file (give imagenet, none or the path of a "
            f"{model} .h5 / .weights.h5 weights file)"
        )
    return weights


@contextlib.contextmanager
def weights_errors(weights, model, include_top):
    """Build a Keras application inside the block; its weights' errors become one line.

    `weights` as `weights_choice` gives it. The ImageNet weights that Keras cannot download
    (it raises a bare Exception when offline) give a `DownloadError` naming the offline
    options; a local file that does not fit gives a `ValueError`, without the warning per
    layer that Keras prints before it fails.
    """
    if weights is None:
        yield
        return
    shape = "" if include_top else " without its top"
    try:
        with warnings.catch_warnings():
            if weights != "imagenet":
                warnings.simplefilter("ignore")
            yield
    except Exception as error:  # h5py, Keras and `get_file` raise many kinds of error
        if weights == "imagenet":
            raise DownloadError(
                f"could not get the ImageNet weights of {model} ({one_line(error)}); "
                "without a network pass --weights none (random initialisation) or "
                "--weights PATH (a local copy of the weights file)"
            ) from None
        raise ValueError(
            f"--weights {weights}: cannot load it into {model}{shape} ({one_line(error)}); "
            f"it must be a .h5 or .weights.h5 file of {model}(include_top={include_top}) "
            "weights"
        ) from None
