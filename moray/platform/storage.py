"""Run storage on any pyarrow filesystem: a local path, `file://`, `s3://`, `gs://`, `hdfs://`...

Jobs keep checkpoints, metrics and exports under one storage root. Locally that is a folder
under the work directory; on a cluster it is shared storage named by a URI in the config. Code
goes through this class, never through `pathlib` on the root, so both work unchanged.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow.fs as pafs


class Storage:
    def __init__(self, root: str, filesystem: pafs.FileSystem | None = None):
        if filesystem is not None:  # an explicit filesystem (e.g. one built with credentials)
            self.fs, self.root = filesystem, root
        elif "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).resolve())
        self.uri = root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, path: str) -> str:
        """`path` (under the root, in the filesystem's terms) as a URI another process can open: the
        root's scheme and the filesystem path; a local root's plain path stays a path."""
        if "://" not in self.uri:
            return path
        scheme = self.uri.split("://", 1)[0]
        return Path(path).as_uri() if scheme == "file" else f"{scheme}://{path}"

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_dirs(self, path: str) -> list[str]:
        if not self.exists(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def list_files(self, path: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(path))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def open(self, path_or_uri: str):
        """A seekable input file: a path under this storage, or a URI of its filesystem."""
        path = path_or_uri
        if "://" in path_or_uri:
            path = pafs.FileSystem.from_uri(path_or_uri)[1]
        return self.fs.open_input_file(path)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def sha256(self, path: str) -> str:
        from moray.platform.files import sha256_stream

        with self.fs.open_input_stream(path) as f:
            return sha256_stream(f)

    def write_bytes(self, path: str, data: bytes) -> None:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def upload_dir(self, local: Path, path: str) -> None:
        self.fs.create_dir(path, recursive=True)
        pafs.copy_files(
            str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
        )

    def download_dir(self, path: str, local: Path) -> Path:
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            path, str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()
        )
        return local
