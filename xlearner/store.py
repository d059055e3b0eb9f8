"""The artifact store: one interface over a local folder and S3.

Every write is an atomic publish: the bytes go to a temporary key first and are moved
(local) or copied (S3) into place, so a reader never sees a half-written artifact. Every
write returns the sha256 of what was published; on S3 it is also kept as object
metadata (``x-amz-meta-sha256``).

URIs: ``s3://bucket/prefix/key`` or a local path (``/abs/path`` or ``rel/path``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHUNK = 8 * 1024 * 1024
TMP_MARK = ".tmp-"


class StoreError(RuntimeError):
    """A store operation failed; the message names the URI and what to do."""


class ArtifactNotFound(StoreError, FileNotFoundError):
    pass


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
        if sha256 and target.exists():
            return target
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
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = ""

        def write_and_hash(tmp: Path) -> None:
            nonlocal digest
            write(tmp)
            digest = sha256_file(tmp)

        atomic_write(target, write_and_hash)
        return digest

    def write_bytes(self, key: str, data: bytes) -> str:
        return self._publish(key, lambda tmp: tmp.write_bytes(data))

    def upload_file(self, key: str, path: str | Path) -> str:
        return self._publish(key, lambda tmp: shutil.copyfile(path, tmp))

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
            if p.is_file() and TMP_MARK not in p.name
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
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
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

    def _publish_tmp(self, key: str, tmp_key: str, digest: str) -> str:
        """Copy the fully written temporary object into place, then drop it."""
        try:
            self.client.copy(
                {"Bucket": self.bucket, "Key": tmp_key},
                self.bucket,
                self._key(key),
                ExtraArgs={"Metadata": {"sha256": digest}, "MetadataDirective": "REPLACE"},
                Config=self.transfer,
            )
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=tmp_key)
        return digest

    def _tmp_key(self, key: str) -> str:
        return self._key(join(".tmp", f"{uuid.uuid4().hex}-{Path(key).name}"))

    def write_bytes(self, key: str, data: bytes) -> str:
        digest = sha256_bytes(data)
        tmp_key = self._tmp_key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=tmp_key, Body=data)
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None
        return self._publish_tmp(key, tmp_key, digest)

    def upload_file(self, key: str, path: str | Path) -> str:
        digest = sha256_file(path)
        tmp_key = self._tmp_key(key)
        try:
            self.client.upload_file(str(path), self.bucket, tmp_key, Config=self.transfer)
        except Exception as err:  # noqa: BLE001
            raise self._error(err, key) from None
        return self._publish_tmp(key, tmp_key, digest)

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
                    if not rel.startswith(".tmp/"):
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
