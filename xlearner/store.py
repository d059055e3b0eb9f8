"""The artifact store: one interface over a local folder and S3.

Every write is an atomic publish, so a reader never sees a half-written artifact: a
local file is written to a temporary sibling and renamed into place; an S3 object is
one PUT, or one multipart upload, to its final key (S3 makes an object visible only
when its PUT or its multipart upload completes). Every write returns the sha256 of what
was published; on S3 it is also kept as object metadata (``x-amz-meta-sha256``).

URIs: ``s3://bucket/prefix/key`` or a local path (``/abs/path`` or ``rel/path``). The S3
endpoint is resolved in one place, :func:`resolve_endpoint_url`: the caller's (the config's
``store.endpoint_url``), else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else
AWS. A process that has no config at hand (a stage reading its config from the store)
gets the config's endpoint through its environment: :func:`endpoint_environment`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 8 * 1024 * 1024
TMP_MARK = ".tmp-"
ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"  # boto3's own variable, read for S3 clients only
DELETE_BATCH = 1000  # the most keys one S3 DeleteObjects request takes


class StoreError(RuntimeError):
    """A store operation failed; the message names the URI and what to do."""


class ArtifactNotFound(StoreError, FileNotFoundError):
    pass


class StoreUnavailable(StoreError):
    """The store could not be reached or refused for now (connection, timeout, 5xx,
    throttling): the same call may well succeed later, unlike a wrong URI or key."""


# S3 error codes that say "not now" rather than "not like this"
TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
     "InternalError", "500", "502", "503", "504"}
)  # fmt: skip


def is_unreachable(err: BaseException) -> bool:
    """A raw S3 client error that says "not now": connection, timeout, 5xx, throttling
    (what :class:`StoreUnavailable` wraps; also for errors that escaped the store)."""
    if "botocore" not in sys.modules:  # no S3 client was ever made: not an S3 error
        return False
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as S3ConnectionError

    if isinstance(err, ClientError):
        return err.response.get("Error", {}).get("Code", "") in TRANSIENT_S3_CODES
    return isinstance(err, S3ConnectionError | HTTPClientError)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write the file ``path`` atomically: ``write(tmp)`` fills a temporary sibling (its
    name holds :data:`TMP_MARK`), which then replaces ``path`` in one rename; a failed
    write leaves no temporary file and the old ``path`` untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_MARK + uuid.uuid4().hex[:8])
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class ArtifactStore(ABC):
    """Keys are ``/``-separated paths below the store's root URI."""

    root_uri: str

    def uri(self, key: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{key.lstrip('/')}" if key else self.root_uri

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> str:
        """Publish ``data`` atomically at ``key``; returns its sha256."""

    @abstractmethod
    def upload_file(self, key: str, path: str | Path) -> str:
        """Publish a local file atomically at ``key``; returns its sha256."""

    @abstractmethod
    def download_file(self, key: str, path: str | Path) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All published keys below ``prefix`` (temporary keys are never listed)."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh local folder for files to :meth:`publish_file`, removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="xlearner-staging-") as folder:
            yield Path(folder)

    def publish_file(self, key: str, path: str | Path, sha256: str) -> None:
        """Publish a local file the caller wrote and hashed (``sha256``), and no longer
        needs: it may be moved into place instead of copied."""
        self.upload_file(key, path)

    def read_json(self, key: str) -> Any:
        try:
            return json.loads(self.read_bytes(key))
        except json.JSONDecodeError as err:
            raise StoreError(f"{self.uri(key)} is not valid JSON: {err}") from None

    def write_json(self, key: str, value: Any) -> str:
        return self.write_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode())

    def local_copy(
        self, key: str, cache_dir: str | Path | None = None, sha256: str | None = None
    ) -> Path:
        """A local path with the artifact's bytes, cached by content hash when known."""
        cache = Path(cache_dir or default_cache_dir())
        name = sha256 or hashlib.sha256(self.uri(key).encode()).hexdigest()
        target = cache / name[:2] / f"{name}{Path(key).suffix}"
        if sha256 and target.exists():  # a cache hit is re-hashed: the cache is not trusted
            if sha256_file(target) == sha256:
                return target
            logging.getLogger(__name__).warning(
                f"{target}: cached copy of {self.uri(key)} does not match its sha256 "
                f"{sha256}; downloading it again"
            )
        target.parent.mkdir(parents=True, exist_ok=True)

        def download_and_check(tmp: Path) -> None:
            self.download_file(key, tmp)
            if sha256 and (actual := sha256_file(tmp)) != sha256:
                raise StoreError(
                    f"{self.uri(key)}: sha256 {actual} does not match the manifest's {sha256}"
                )

        return atomic_write(target, download_and_check)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XLEARNER_CACHE", Path.home() / ".cache" / "xlearner"))


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root_uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key.lstrip("/")).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"{self.uri(key)} does not exist") from None

    def _publish(self, key: str, write) -> str:
        target = self._path(key)
        digest = ""

        def write_and_hash(tmp: Path) -> None:
            nonlocal digest
            write(tmp)
            digest = sha256_file(tmp)

        def publish() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, write_and_hash)

        self._writable(publish)
        return digest

    def _writable(self, write: Callable[[], T]) -> T:
        """``write()``; a store folder that is not writable is reported as such."""
        try:
            return write()
        except OSError as err:
            if not (isinstance(err, PermissionError) or err.errno == errno.EROFS):
                raise
            raise StoreError(
                f"store folder {self.root} is not writable ({err.strerror}: {err.filename}); "
                "fix its permissions or set store.uri to a folder this user can write"
            ) from None

    def write_bytes(self, key: str, data: bytes) -> str:
        return self._publish(key, lambda tmp: tmp.write_bytes(data))

    def upload_file(self, key: str, path: str | Path) -> str:
        return self._publish(key, lambda tmp: shutil.copyfile(path, tmp))

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """On the store's file system (a folder named with TMP_MARK, never listed), so
        :meth:`publish_file` is a rename, not a second write."""

        def make() -> str:
            self.root.mkdir(parents=True, exist_ok=True)
            return tempfile.mkdtemp(prefix=".staging" + TMP_MARK, dir=self.root)

        folder = Path(self._writable(make))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish_file(self, key: str, path: str | Path, sha256: str) -> None:
        """One rename when ``path`` is on the store's file system (see :meth:`staging`)."""
        target = self._path(key)

        def move() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(path, target)
            except OSError as err:
                if err.errno != errno.EXDEV:  # another file system: copied, atomically
                    raise
                self.upload_file(key, path)

        self._writable(move)

    def download_file(self, key: str, path: str | Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise ArtifactNotFound(f"{self.uri(key)} does not exist") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and TMP_MARK not in p.relative_to(self.root).as_posix()
        ]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        super().delete_prefix(prefix)
        folder = self._path(prefix)
        if folder.is_dir():  # the emptied folders too: a local store looks like S3's listing
            shutil.rmtree(folder, ignore_errors=True)


class S3Store(ArtifactStore):
    """S3 or an S3-compatible store (``endpoint_url``); credentials come from the environment."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = resolve_endpoint_url(endpoint_url)
        self.root_uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=64 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024
        )

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _error(self, err: Exception, key: str) -> StoreError:
        from botocore.exceptions import ClientError, NoCredentialsError

        uri = self.uri(key)
        if is_unreachable(err) and not isinstance(err, ClientError):
            return StoreUnavailable(
                f"{uri}: cannot reach the S3 endpoint {self.endpoint_url or 'AWS'} "
                f"({type(err).__name__}); is the server up?"
            )
        if isinstance(err, NoCredentialsError):
            return StoreError(
                f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}:
                return StoreError(
                    f"{uri}: S3 rejected the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                    f"AWS_SECRET_ACCESS_KEY for endpoint {self.endpoint_url or 'AWS'}"
                )
            if code in {"NoSuchKey", "404", "NotFound"}:
                return ArtifactNotFound(f"{uri} does not exist")
            if code == "NoSuchBucket":
                return StoreError(f"{uri}: bucket {self.bucket!r} does not exist; create it first")
            if is_unreachable(err):
                return StoreUnavailable(f"{uri}: S3 answered {code}; try again later")
        return StoreError(f"{uri}: {type(err).__name__}: {err}")

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:  # noqa: BLE001 - classified below
            mapped = self._error(err, key)
            if isinstance(mapped, ArtifactNotFound):
                return False
            raise mapped from None

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None

    def write_bytes(self, key: str, data: bytes) -> str:
        digest = sha256_bytes(data)
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": digest}
            )
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None
        return digest

    def upload_file(self, key: str, path: str | Path) -> str:
        """One PUT below the multipart threshold, else a multipart upload that boto3 aborts
        on failure: either way the object appears whole or not at all."""
        digest = sha256_file(path)
        self.publish_file(key, path, digest)
        return digest

    def publish_file(self, key: str, path: str | Path, sha256: str) -> None:
        try:
            self.client.upload_file(
                str(path),
                self.bucket,
                self._key(key),
                ExtraArgs={"Metadata": {"sha256": sha256}},
                Config=self.transfer,
            )
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None

    def download_file(self, key: str, path: str | Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        full = self._key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) + 1 :] if self.prefix else obj["Key"]
                    if not rel.startswith(".tmp/"):  # left by earlier versions' publishes
                        yield rel
        except Exception as err:  # noqa: BLE001
            raise self._error(err, prefix) from None

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.iter_keys(prefix))

    def stat(self, prefix: str = "") -> list[list]:
        """``[key, size, etag]`` of every published key below ``prefix`` (a cheap fingerprint)."""
        full = self._key(prefix)
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                out.extend(
                    [obj["Key"], obj["Size"], obj.get("ETag", "")]
                    for obj in page.get("Contents", [])
                )
        except Exception as err:  # noqa: BLE001
            raise self._error(err, prefix) from None
        return sorted(out)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None

    def delete_prefix(self, prefix: str) -> None:
        """One DeleteObjects request per :data:`DELETE_BATCH` keys."""
        keys = [self._key(key) for key in self.iter_keys(prefix)]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + DELETE_BATCH]]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except Exception as err:  # noqa: BLE001
                raise self._error(err, prefix) from None
            if errors := response.get("Errors"):
                first = errors[0]
                raise StoreError(
                    f"{self.uri(prefix)}: {len(errors)} keys were not deleted, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}"
                )


def resolve_endpoint_url(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: ``endpoint_url`` (the config's), else the environment's, else
    None (AWS)."""
    return endpoint_url or os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")


def endpoint_environment(endpoint_url: str | None) -> dict[str, str]:
    """The variables that make every :func:`open_store` of a child process (a stage) use
    ``endpoint_url``, the config's ``store.endpoint_url``; none when it is unset."""
    return {ENDPOINT_ENV: endpoint_url} if endpoint_url else {}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def open_store(uri: str, endpoint_url: str | None = None) -> ArtifactStore:
    """The store rooted at ``uri`` (a local folder or ``s3://bucket/prefix``)."""
    if is_s3(uri):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StoreError(f"{uri}: an S3 URI needs a bucket, e.g. s3://my-bucket/xlearner")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url)
    if "://" in uri:
        raise StoreError(f"{uri}: unsupported URI scheme; use a local path or s3://bucket/prefix")
    return LocalStore(uri)


def resolve(uri: str, endpoint_url: str | None = None) -> tuple[ArtifactStore, str]:
    """Split a full artifact URI into (the store of its parent folder, the key below it)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return open_store(parent or ".", endpoint_url), name
