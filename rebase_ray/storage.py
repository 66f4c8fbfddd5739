"""URIs → filesystems, atomic writes, Parquet/JSON/bytes I/O and checksummed manifests.

One `Storage` object serves any URI: a local path, `file://...` or `s3://bucket/prefix`.
It exposes an fsspec filesystem (`fs`) for general I/O and a pyarrow filesystem (`pa_fs`) for
Ray Data and Arrow readers. S3 settings come from `S3Config` or the standard AWS environment
variables; the endpoint is passed to pyarrow explicitly because pyarrow ignores
AWS_ENDPOINT_URL.

Writes are atomic: a reader never sees a partial object. Locally we write a temporary file in
the same folder and rename it; on S3 one PUT (or completed multipart upload) is atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from rebase_ray.config.schema import S3Config

SUPPORTED_SCHEMES = ("", "file", "s3")
MANIFEST = "manifest.json"


class StorageError(RuntimeError):
    """A storage URI is malformed, unreachable, or an object is missing or corrupt."""


class ChecksumError(StorageError):
    """A file does not match the sha256 recorded in its manifest."""


# Errors worth retrying: network hiccups and throttling. Missing files and bad URIs are not.
_TRANSIENT = (ConnectionError, TimeoutError)
_retry = retry(
    retry=retry_if_exception_type(_TRANSIENT),
    stop=stop_after_attempt(5),
    wait=wait_exponential(multiplier=0.2, max=5),
    reraise=True,
)


def split_uri(uri: str) -> tuple[str, str]:
    """('s3', 'bucket/key') or ('file', '/abs/path'); raises StorageError for bad URIs."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty storage URI: {uri!r}")
    uri = uri.strip()
    if "://" not in uri:
        return "file", str(Path(uri).expanduser().resolve())
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise StorageError(
            f"unsupported URI scheme '{scheme}://' in {uri!r}; use a local path, file:// or s3://")
    if scheme == "file":
        return "file", str(Path(parsed.netloc + parsed.path).expanduser().resolve())
    if not parsed.netloc:
        raise StorageError(f"S3 URI without a bucket: {uri!r} (expected s3://bucket/prefix)")
    return "s3", (parsed.netloc + parsed.path).rstrip("/")


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] != "file"


def s3_settings(cfg: S3Config | None = None) -> dict[str, Any]:
    """Resolved S3 settings: explicit config first, then the standard AWS environment variables."""
    cfg = cfg or S3Config()
    return {
        "endpoint_url": cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL"),
        "key": cfg.key or os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret": cfg.secret or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "region": cfg.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        "anon": cfg.anon,
    }


class Storage:
    """Filesystem access for one URI scheme (local or S3). Paths passed in are full URIs."""

    def __init__(self, scheme: str, s3: S3Config | None = None):
        self.scheme = scheme
        self.s3 = s3 or S3Config()
        if scheme == "file":
            self.fs = fsspec.filesystem("file", auto_mkdir=True)
            self.pa_fs: pafs.FileSystem = pafs.LocalFileSystem()
        else:
            opts = s3_settings(self.s3)
            client_kwargs = {"endpoint_url": opts["endpoint_url"]} if opts["endpoint_url"] else {}
            self.fs = fsspec.filesystem(
                "s3", key=opts["key"], secret=opts["secret"], anon=opts["anon"],
                client_kwargs=client_kwargs, skip_instance_cache=True,
            )
            self.pa_fs = _pyarrow_s3(opts)

    @classmethod
    def for_uri(cls, uri: str, s3: S3Config | None = None) -> Storage:
        return cls(split_uri(uri)[0], s3)

    # -- paths ----------------------------------------------------------------------------

    def path(self, uri: str) -> str:
        """The filesystem path (no scheme) for a URI, as fsspec and pyarrow expect it."""
        scheme, path = split_uri(uri)
        if scheme != self.scheme:
            raise StorageError(f"{uri!r} is not on this {self.scheme} storage")
        return path

    def uri(self, path: str) -> str:
        return path if self.scheme == "file" else f"s3://{path}"

    @staticmethod
    def join(uri: str, *parts: str) -> str:
        if "://" in uri:
            return posixpath.join(uri.rstrip("/"), *parts)
        return str(Path(uri).joinpath(*parts))

    # -- queries --------------------------------------------------------------------------

    @_retry
    def exists(self, uri: str) -> bool:
        return self.fs.exists(self.path(uri))

    @_retry
    def ls(self, uri: str, pattern: str = "*") -> list[str]:
        """URIs directly under `uri` (or matching a glob), sorted; [] when there are none."""
        path = self.path(uri)
        self._check_bucket(path)
        if any(c in path for c in "*?["):
            found = self.fs.glob(path)
        else:
            found = self.fs.glob(posixpath.join(path, pattern)) if self.fs.isdir(path) else []
        return sorted(self.uri(p) for p in found)

    def glob(self, uri: str) -> list[str]:
        """Files matching a path or a glob (a plain file matches itself), sorted."""
        path = self.path(uri)
        self._check_bucket(path)
        if any(c in path for c in "*?["):
            return sorted(self.uri(p) for p in self.fs.glob(path) if self.fs.isfile(p))
        if self.fs.isfile(path):
            return [self.uri(path)]
        if self.fs.isdir(path):
            return sorted(self.uri(p) for p in self.fs.find(path))
        raise StorageError(f"no such file or folder: {uri}")

    @_retry
    def size(self, uri: str) -> int:
        return int(self.fs.size(self.path(uri)))

    # -- reads ----------------------------------------------------------------------------

    @_retry
    def read_bytes(self, uri: str) -> bytes:
        path = self.path(uri)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            self._check_bucket(path)
            raise StorageError(f"no such object: {uri}") from None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str) -> Any:
        try:
            return json.loads(self.read_bytes(uri))
        except json.JSONDecodeError as exc:
            raise StorageError(f"{uri} is not valid JSON: {exc}") from None

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(uri)), columns=columns)

    # -- writes (atomic) ------------------------------------------------------------------

    @_retry
    def write_bytes(self, uri: str, data: bytes) -> str:
        """Write `data` atomically; returns its sha256."""
        path = self.path(uri)
        if self.scheme == "file":
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                       suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            try:
                self.fs.pipe_file(path, data)  # one PUT: visible whole or not at all
            except (FileNotFoundError, PermissionError):
                self._check_bucket(path)
                raise
        return hashlib.sha256(data).hexdigest()

    def write_text(self, uri: str, text: str) -> str:
        return self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> str:
        return self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True,
                                                default=str).encode("utf-8"))

    def write_parquet(self, uri: str, table: pa.Table) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_bytes(uri, buf.getvalue())

    def upload_dir(self, local_dir: str, uri: str) -> list[str]:
        """Copy a local folder's files under `uri` (each file written atomically)."""
        written = []
        for root, _, files in os.walk(local_dir):
            for name in sorted(files):
                src = os.path.join(root, name)
                rel = os.path.relpath(src, local_dir)
                dst = self.join(uri, *Path(rel).parts)
                self.write_bytes(dst, Path(src).read_bytes())
                written.append(dst)
        return written

    def download_dir(self, uri: str, local_dir: str) -> str:
        """Copy every file under `uri` into a local folder; returns the folder."""
        base = self.path(uri)
        for path in self.fs.find(base):
            rel = posixpath.relpath(path, base)
            dst = Path(local_dir, *rel.split("/"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(self.read_bytes(self.uri(path)))
        return local_dir

    @_retry
    def delete(self, uri: str, recursive: bool = False) -> None:
        path = self.path(uri)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    # -- manifests ------------------------------------------------------------------------

    def sha256(self, uri: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.path(uri), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def write_manifest(self, folder: str, data: dict[str, Any], files: list[str]) -> dict:
        """Write `<folder>/manifest.json` with `data` plus sha256 and size of each file
        (paths relative to the folder). Written last, so its presence marks a finished stage."""
        entries = {}
        for rel in files:
            uri = self.join(folder, rel)
            entries[rel] = {"sha256": self.sha256(uri), "bytes": self.size(uri)}
        manifest = {**data, "files": entries, "written_at": time.time()}
        self.write_json(self.join(folder, MANIFEST), manifest)
        return manifest

    def read_manifest(self, folder: str) -> dict | None:
        uri = self.join(folder, MANIFEST)
        return self.read_json(uri) if self.exists(uri) else None

    def verify(self, folder: str, manifest: dict | None = None,
               only: list[str] | None = None) -> None:
        """Raise ChecksumError if any listed file is missing or differs from its manifest."""
        manifest = manifest if manifest is not None else self.read_manifest(folder)
        if manifest is None:
            raise StorageError(f"no {MANIFEST} in {folder}")
        for rel, entry in manifest.get("files", {}).items():
            if only is not None and rel not in only:
                continue
            uri = self.join(folder, rel)
            if not self.exists(uri):
                raise ChecksumError(f"{uri} is listed in its manifest but missing")
            actual = self.sha256(uri)
            if actual != entry["sha256"]:
                raise ChecksumError(
                    f"{uri} was modified: sha256 {actual[:12]}… does not match the manifest's "
                    f"{entry['sha256'][:12]}…; rebuild it (--force) or restore the file")

    # -- helpers --------------------------------------------------------------------------

    def _check_bucket(self, path: str) -> None:
        if self.scheme != "s3":
            return
        bucket = path.split("/", 1)[0]
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StorageError(f"S3 bucket '{bucket}' does not exist "
                               f"(endpoint {s3_settings(self.s3)['endpoint_url'] or 'AWS'})") from None
        except PermissionError as exc:
            raise StorageError(f"access denied to S3 bucket '{bucket}': {exc}") from None
        except OSError as exc:
            raise StorageError(f"cannot reach S3 bucket '{bucket}': {exc}") from None


def _pyarrow_s3(opts: dict[str, Any]) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if opts["anon"]:
        kwargs["anonymous"] = True
    elif opts["key"]:
        kwargs.update(access_key=opts["key"], secret_key=opts["secret"])
    if opts["region"]:
        kwargs["region"] = opts["region"]
    if opts["endpoint_url"]:
        parsed = urlparse(opts["endpoint_url"])
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def open_storage(uri: str, s3: S3Config | None = None) -> tuple[Storage, str]:
    """(storage, normalized uri) for any URI; local paths become absolute."""
    scheme, path = split_uri(uri)
    st = Storage(scheme, s3)
    return st, st.uri(path)
