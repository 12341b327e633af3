"""Where outputs go: a local or mounted path, or a URI on shared or object storage (`s3://`, `gs://`,
`hdfs://`, anything `pyarrow.fs` opens, as Ray Train's `storage_path` does).

Writers never write into a URI directly: they write into a local staging directory (`staged`), which is
uploaded when it is whole; readers download what they need (`fetched`). For a local path both give the
path itself. Credentials and endpoints come from the usual environment of each filesystem
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server,
`GOOGLE_APPLICATION_CREDENTIALS`, ...), on every node that writes or reads.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.config import ConfigError

log = logging.getLogger(__name__)


class StorageError(ConfigError):
    """A storage location that cannot be opened, written or read."""


def is_uri(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def join(location: str, *parts: str) -> str:
    """`location` with `parts` appended: a path for a path, a URI for a URI."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    return "/".join([str(location).rstrip("/"), *parts])


def basename(location: str) -> str:
    """The last part of a path or URI (a run's name)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _open(location: str):
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(str(location).removeprefix("file://")).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as exc:  # pyarrow's errors are ArrowInvalid, OSError, ValueError by scheme
        raise StorageError(f"cannot open {location}: {exc}. Give a local path, a mounted shared path or a URI "
                           f"pyarrow.fs opens (s3://bucket/prefix, gs://bucket/prefix, hdfs://...)") from exc


class Location:
    """A directory at a local path or a URI, and the few operations outputs need."""

    def __init__(self, location: str):
        self.location = str(location)
        self.fs, self.root = _open(self.location)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _type(self, rel: str):
        return self.fs.get_file_info(self._path(rel)).type

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self._type(rel) == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._type(rel) == pafs.FileType.Directory

    def _entries(self) -> list:
        """What is directly in this directory (nothing where it does not exist)."""
        import pyarrow.fs as pafs

        if not self.is_dir():
            return []
        return self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))

    def subdirs(self) -> list[str]:
        """Names of the directories directly in this one."""
        import pyarrow.fs as pafs

        return [info.base_name for info in self._entries() if info.type == pafs.FileType.Directory]

    def names(self) -> list[str]:
        """Names of the files and directories directly in this one."""
        return [info.base_name for info in self._entries()]

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        self.fs.create_dir(self._path(rel).rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(text.encode())

    def delete(self, rel: str) -> None:
        """Remove the directory or file `rel` where it exists."""
        if self.is_dir(rel):
            self.fs.delete_dir(self._path(rel))
        elif self.is_file(rel):
            self.fs.delete_file(self._path(rel))

    def upload(self, local: Path, rel: str = "") -> None:
        """Copy the local directory `local` into `rel` (files already there with other names stay)."""
        import pyarrow.fs as pafs

        self.fs.create_dir(self._path(rel), recursive=True)
        pafs.copy_files(str(local), self._path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, rel: str, local: Path) -> None:
        """Copy the file or directory `rel` to the local path `local`."""
        import pyarrow.fs as pafs

        (local if self.is_dir(rel) else local.parent).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self._path(rel), str(local), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())


def check_writable(location: str, field: str) -> None:
    """Write and remove a probe file under `location`; a StorageError naming `field` where that fails."""
    place = Location(location)
    probe = f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        place.write_text(probe, "ok")
        place.delete(probe)
    except OSError as exc:
        raise StorageError(f"{field} = {location} cannot be written ({exc}). Give a path or a bucket that this "
                           f"machine (and every node that writes there) can write to, with its credentials in "
                           f"the environment") from exc


@contextmanager
def staged(location: str) -> Iterator[Path]:
    """A local directory to write `location`'s files into: `location` itself for a path; for a URI a
    temporary directory, uploaded and removed when the block ends without an error (kept, and said where,
    when it ends with one)."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    local = Path(tempfile.mkdtemp(prefix="rlhf-staged-"))
    try:
        yield local
    except BaseException:
        log.warning("not uploaded to %s (the writer failed); what was written stays in %s", location, local)
        raise
    Location(location).upload(local)
    shutil.rmtree(local, ignore_errors=True)


@contextmanager
def fetched(location: str, names: tuple[str, ...]) -> Iterator[Path]:
    """A local directory holding `names` (files or directories) of `location`: `location` itself for a
    path; for a URI a temporary download, removed when the block ends."""
    if not is_uri(location):
        yield Path(location)
        return
    local = Path(tempfile.mkdtemp(prefix="rlhf-fetched-"))
    try:
        place = Location(location)
        for name in names:
            place.download(name, local / name)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)
