"""The artifact store on both backends (local folder and a real S3 server)."""

from __future__ import annotations

import os

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from xlearner.store import (
    TMP_MARK,
    ArtifactNotFound,
    LocalStore,
    S3Store,
    StoreError,
    open_store,
    resolve,
    sha256_bytes,
    sha256_file,
)


def test_write_read_and_sha256(store):
    digest = store.write_bytes("a/b/blob.bin", b"hello")
    assert digest == sha256_bytes(b"hello")
    assert store.read_bytes("a/b/blob.bin") == b"hello"
    assert store.exists("a/b/blob.bin") and not store.exists("a/b/other.bin")
    store.write_json("a/meta.json", {"x": [1, 2]})
    assert store.read_json("a/meta.json") == {"x": [1, 2]}
    assert store.list("a") == ["a/b/blob.bin", "a/meta.json"]
    assert store.list("nothing-here") == []
    if isinstance(store, S3Store):  # the digest is kept as object metadata
        head = store.client.head_object(Bucket=store.bucket, Key=store._key("a/b/blob.bin"))
        assert head["Metadata"]["sha256"] == digest


def test_overwrite_is_atomic_replace(store, tmp_path):
    store.write_bytes("k.txt", b"one")
    path = tmp_path / "two.txt"
    path.write_bytes(b"two" * 1000)
    assert store.upload_file("k.txt", path) == sha256_file(path)
    assert store.read_bytes("k.txt") == b"two" * 1000
    assert store.list("") == ["k.txt"]


def test_list_never_shows_temporary_keys(store):
    store.write_bytes("data/real.bin", b"x")
    if isinstance(store, LocalStore):
        (store.root / "data" / f"half.bin{TMP_MARK}abcd1234").write_bytes(b"partial")
    else:
        store.client.put_object(
            Bucket=store.bucket, Key=store._key(".tmp/abc-half.bin"), Body=b"partial"
        )
    assert store.list("") == ["data/real.bin"]


def test_missing_keys(store, tmp_path):
    with pytest.raises(ArtifactNotFound, match="missing.bin does not exist"):
        store.read_bytes("missing.bin")
    with pytest.raises(ArtifactNotFound, match="missing.bin does not exist"):
        store.download_file("missing.bin", tmp_path / "out.bin")
    assert not store.exists("missing.bin")
    store.delete("missing.bin")  # deleting nothing is fine


def test_large_file_multipart(store, tmp_path):
    if isinstance(store, S3Store):  # force the multipart upload and download paths
        store.transfer = TransferConfig(
            multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20
        )
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(11 * 2**20))
    digest = store.upload_file("big/big.bin", path)
    assert digest == sha256_file(path)
    copy = store.local_copy("big/big.bin", tmp_path / "cache", sha256=digest)
    assert sha256_file(copy) == digest
    assert store.list("big") == ["big/big.bin"]


def test_local_copy_checks_sha256(store, tmp_path):
    store.write_bytes("x.bin", b"content")
    with pytest.raises(StoreError, match="does not match the manifest"):
        store.local_copy("x.bin", tmp_path / "cache", sha256="0" * 64)


def test_delete_prefix(store):
    for key in ("p/a", "p/b/c", "q/d"):
        store.write_bytes(key, b"1")
    store.delete_prefix("p")
    assert store.list("") == ["q/d"]
    if isinstance(store, LocalStore):  # no empty folders left behind
        assert not (store.root / "p").exists()


def test_resolve_splits_uri(tmp_path):
    store, key = resolve(str(tmp_path / "x" / "manifest.json"))
    assert key == "manifest.json" and store.root_uri == str(tmp_path / "x")


def test_local_key_cannot_escape_root(tmp_path):
    store = open_store(str(tmp_path / "root"))
    with pytest.raises(StoreError, match="escapes the store root"):
        store.write_bytes("../outside.txt", b"x")


def test_unsupported_scheme():
    with pytest.raises(StoreError, match="unsupported URI scheme"):
        open_store("gs://bucket/x")


def test_wrong_credentials_are_named_without_the_secret(s3_server, monkeypatch):
    wrong_secret = "WrongSecret-" + "z" * 20
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    # boto3's default session caches the first credentials it resolved in this process
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    store = open_store(s3_server.uri("creds"), endpoint_url=s3_server.endpoint_url)
    with pytest.raises(StoreError) as info:
        store.write_bytes("x.bin", b"x")
    message = str(info.value)
    assert "credentials" in message
    assert wrong_secret not in message and s3_server.secret_key not in message
    with pytest.raises(StoreError, match="credentials"):
        store.list("")


@pytest.fixture
def s3_store(store) -> S3Store:
    if not isinstance(store, S3Store):
        pytest.skip("S3 only")
    return store


def record_requests(store: S3Store) -> list[str]:
    """The S3 operations ``store`` sends from now on (a botocore event hook)."""
    sent: list[str] = []
    store.client.meta.events.register(
        "before-call.s3", lambda model, **_: sent.append(model.name), unique_id=str(id(sent))
    )
    return sent


def raw_keys(store: S3Store) -> list[str]:
    """Every object below the store's prefix, temporary or not (no filter of ours)."""
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "/")
    return sorted(obj["Key"][len(store.prefix) + 1 :] for obj in listed.get("Contents", []))


def test_s3_publish_writes_each_byte_once_to_the_final_key(s3_store, tmp_path):
    s3_store.transfer = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 2**20))  # 3 parts
    small = tmp_path / "small.bin"
    small.write_bytes(b"small")
    sent = record_requests(s3_store)
    s3_store.write_bytes("k/a.json", b"{}")
    s3_store.upload_file("k/small.bin", small)
    assert sent == ["PutObject", "PutObject"]  # no temporary key, no copy, no delete
    sent.clear()
    digest = s3_store.upload_file("k/big.bin", big)
    assert sent[0] == "CreateMultipartUpload" and sent[-1] == "CompleteMultipartUpload"
    assert sorted(set(sent)) == ["CompleteMultipartUpload", "CreateMultipartUpload", "UploadPart"]
    assert sent.count("UploadPart") == 3
    assert raw_keys(s3_store) == ["k/a.json", "k/big.bin", "k/small.bin"]
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=s3_store._key("k/big.bin"))
    assert head["Metadata"]["sha256"] == digest == sha256_file(big)


def test_s3_failed_multipart_upload_publishes_nothing(s3_store, tmp_path):
    s3_store.transfer = TransferConfig(
        multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20, max_concurrency=1
    )
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 2**20))
    parts = []

    def fail_the_second_part(**_) -> None:
        parts.append(1)
        if len(parts) == 2:
            raise ConnectionError("network went away")

    s3_store.client.meta.events.register("before-call.s3.UploadPart", fail_the_second_part)
    with pytest.raises(StoreError, match="k/big.bin"):
        s3_store.upload_file("k/big.bin", big)
    assert len(parts) == 2 and not s3_store.exists("k/big.bin") and raw_keys(s3_store) == []
    uploads = s3_store.client.list_multipart_uploads(Bucket=s3_store.bucket, Prefix=s3_store.prefix)
    assert uploads.get("Uploads", []) == []  # aborted, no parts left billed


def test_s3_delete_prefix_is_batched(s3_store):
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"p/{i:04d}" for i in range(1001)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3_store.write_bytes(key, b"1"), keys))
    s3_store.write_bytes("q/kept", b"1")
    sent = record_requests(s3_store)
    s3_store.delete_prefix("p")
    assert sent.count("DeleteObjects") == 2 and "DeleteObject" not in sent  # 1000 + 1
    assert raw_keys(s3_store) == ["q/kept"]
