"""Object keys (hostile post_ids included), the local store, and S3Store against moto in-process."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from etl.errors import ConfigError, StoreError
from etl.store import KEY_FORMAT, KeyHeld, LocalStore, S3Store, object_key, safe_segment, store_from_settings
from tests.support import png_bytes

WHEN = datetime(2024, 3, 9, 23, 30, tzinfo=timezone(timedelta(hours=-5)))  # 2024-03-10 04:30 UTC
HOSTILE_IDS = [
    "..",
    ".",
    "../../etc/passwd",
    "/",
    "/abs",
    "a/b",
    "a\\b",
    "C:\\Windows",
    "a\x00b",
    "line\nbreak",
    "tab\there",
    "\x1b[31mred",
    "%2F",
    "~",
    "a b",
    "😀",
    "x" * 5000,
    "é" * 400,
]


@pytest.mark.parametrize("post_id", ["1234567890", "dQw4w9WgXcQ", "abc_DEF-9", "17841400000000000_1"])
def test_ordinary_ids_are_kept_as_they_are(post_id):
    assert safe_segment(post_id) == post_id


@pytest.mark.parametrize("post_id", HOSTILE_IDS)
def test_hostile_ids_become_one_safe_segment(post_id):
    segment = safe_segment(post_id)
    assert segment and len(segment) <= 180
    assert set(segment) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-%~")
    assert segment not in (".", "..")


def test_hostile_ids_never_collide():
    segments = [safe_segment(i) for i in HOSTILE_IDS + ["a_b", "a%2Fb", "x" * 4999, "x" * 5001]]
    assert len(set(segments)) == len(segments)
    assert safe_segment("a/b") == "a%2Fb" != safe_segment("a_b")
    assert safe_segment("a%2Fb") == "a%252Fb"


def test_long_ids_are_cut_and_hashed():
    long_id = "y" * 1000
    segment = safe_segment(long_id)
    assert len(segment) == 180
    assert segment.endswith("~" + hashlib.sha256(long_id.encode()).hexdigest()[:40])
    assert safe_segment("y" * 180) == "y" * 180  # exactly at the limit: kept whole


def test_empty_segment_is_refused():
    with pytest.raises(ValueError):
        safe_segment("")


def test_object_key_follows_the_contract():
    key = object_key("archive/", "twitter", WHEN, "1767", 2, "image/jpeg")
    assert key == "archive/twitter/2024/03/10/1767/2.jpg"  # the date is created_at in UTC
    assert KEY_FORMAT.startswith("{prefix}{platform}/")
    assert object_key("", "mock", WHEN, "a/b", 0, "image/png") == "mock/2024/03/10/a%2Fb/0.png"
    assert object_key("", "mock", WHEN, "x", 0, "image/webp").endswith("/0.webp")
    assert object_key("", "mock", WHEN, "x", 0, "image/gif").endswith("/0.gif")


def test_object_key_refuses_unknown_content_types():
    with pytest.raises(ValueError, match="text/html"):
        object_key("", "mock", WHEN, "1", 0, "text/html")


# -- the local store ----------------------------------------------------------------------------------


def test_local_put_is_atomic_and_skips_same_content(tmp_path: Path):
    store = LocalStore(tmp_path / "objects")
    store.check()
    body = png_bytes()
    sha = hashlib.sha256(body).hexdigest()
    key = object_key("", "mock", WHEN, "p1", 0, "image/png")
    assert store.put(key, body, "image/png", sha) is True
    path = tmp_path / "objects" / key
    assert path.read_bytes() == body
    mtime = path.stat().st_mtime_ns
    assert store.put(key, body, "image/png", sha) is False  # same content: not written again
    assert path.stat().st_mtime_ns == mtime
    other = png_bytes(color=(1, 2, 3))
    with pytest.raises(KeyHeld):  # other bytes: kept (another run stored them first), unless a repair replaces them
        store.put(key, other, "image/png", hashlib.sha256(other).hexdigest())
    assert path.read_bytes() == body
    assert store.put(key, other, "image/png", hashlib.sha256(other).hexdigest(), replace=True) is True
    assert path.read_bytes() == other
    assert not list(path.parent.glob("*.part")) and not list(store.incoming.iterdir())
    assert store.url(key) == path.resolve().as_uri()


def test_a_later_runs_store_finds_what_an_earlier_one_wrote(tmp_path: Path):
    # The quick path asks nothing of a folder it made itself (it holds nothing yet); a folder that was there
    # already is looked into, so a rerun writes nothing again.
    key = object_key("", "mock", WHEN, "p1", 0, "image/png")
    body = png_bytes()
    earlier = LocalStore(tmp_path / "objects")
    earlier.check()
    assert earlier.put(key, body, "image/png", hashlib.sha256(body).hexdigest()) is True
    path = tmp_path / "objects" / key
    mtime = path.stat().st_mtime_ns
    later = LocalStore(tmp_path / "objects")
    later.check()
    assert later.put(key, body, "image/png", hashlib.sha256(body).hexdigest()) is False
    assert path.stat().st_mtime_ns == mtime
    second = object_key("", "mock", WHEN, "p1", 1, "image/png")  # the same post's next image, in a known folder
    assert later.put(second, body, "image/png", hashlib.sha256(body).hexdigest()) is True
    assert later.put(second, body, "image/png", hashlib.sha256(body).hexdigest()) is False


@pytest.mark.parametrize("post_id", HOSTILE_IDS)
def test_hostile_ids_stay_inside_the_root(tmp_path: Path, post_id):
    root = tmp_path / "objects"
    store = LocalStore(root)
    key = object_key("", "mock", WHEN, post_id, 0, "image/png")
    body = png_bytes()
    store.put(key, body, "image/png", hashlib.sha256(body).hexdigest())
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1
    assert root.resolve() in written[0].resolve().parents
    assert written[0].parent.parent == root / "mock" / "2024" / "03" / "10"  # the id is one directory level


@pytest.mark.parametrize("key", ["../outside.png", "/etc/passwd", "a/../../outside.png", "nul\x00.png"])
def test_local_store_refuses_keys_leading_outside(tmp_path: Path, key):
    store = LocalStore(tmp_path / "objects")
    with pytest.raises(StoreError):
        store.put(key, b"x", "image/png", "0" * 64)
    assert not (tmp_path / "outside.png").exists()


def checked_store(tmp_path: Path) -> tuple[LocalStore, bytes, str]:
    """A checked local store under tmp_path/objects, and an image with its sha256."""
    store = LocalStore(tmp_path / "objects")
    store.check()
    body = png_bytes()
    return store, body, hashlib.sha256(body).hexdigest()


@pytest.mark.badinput("keys a checked store's quick put path must leave to the general one, which refuses them")
@pytest.mark.parametrize("key", ["/etc/passwd", "a/../../outside.png", "./x/../../outside.png", "nul\x00/x.png"])
def test_checked_local_store_refuses_unusual_keys(tmp_path: Path, key):
    store = LocalStore(tmp_path / "objects")
    store.check()
    with pytest.raises(StoreError):
        store.put(key, b"x", "image/png", "0" * 64)
    assert [p.name for p in (tmp_path / "objects").iterdir()] == [".incoming"]  # nothing made on the way
    assert not (tmp_path / "outside.png").exists()


@pytest.mark.fault("a folder of the store is a symlink to a directory outside it")
def test_local_store_refuses_a_folder_linked_outside(tmp_path: Path):
    store, body, sha = checked_store(tmp_path)
    assert store.put(object_key("", "mock", WHEN, "p1", 0, "image/png"), body, "image/png", sha) is True
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "objects" / "mock" / "2024" / "03" / "10" / "p2").symlink_to(outside)
    with pytest.raises(StoreError, match="outside the store"):
        store.put(object_key("", "mock", WHEN, "p2", 0, "image/png"), body, "image/png", sha)
    assert not list(outside.iterdir())


def test_local_store_urls_name_the_resolved_file(tmp_path: Path):
    store, body, sha = checked_store(tmp_path)
    first = object_key("", "mock", WHEN, "p 1", 0, "image/png")
    second = object_key("", "mock", WHEN, "p 1", 1, "image/png")
    assert store.put(first, body, "image/png", sha) is True
    (tmp_path / "objects" / second).symlink_to(tmp_path / "objects" / first)  # one object linked to another
    assert store.put(second, body, "image/png", sha) is False
    assert store.url(first) == (tmp_path / "objects" / first).resolve().as_uri()
    assert store.url(second) == store.url(first)


@pytest.mark.fault("the store's .incoming folder is removed while a run writes")
def test_local_put_recreates_a_removed_incoming_folder(tmp_path: Path):
    store, body, sha = checked_store(tmp_path)
    assert store.put(object_key("", "mock", WHEN, "p1", 0, "image/png"), body, "image/png", sha) is True
    store.incoming.rmdir()
    key = object_key("", "mock", WHEN, "p2", 0, "image/png")
    assert store.put(key, body, "image/png", sha) is True
    assert (tmp_path / "objects" / key).read_bytes() == body
    assert store.put(key, body, "image/png", sha) is False


def test_local_store_check_names_the_setting(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="ETL_DATA_DIR"):
        LocalStore(blocker / "objects").check()


# -- S3 through moto, in-process ----------------------------------------------------------------------


# moto's in-process mock intercepts boto3 only; the direct PUT path (urllib3) is tested over HTTP in test_s3_direct.
BOTO3_ONLY = {"AWS_REGION": "us-east-1", "S3_DIRECT_PUT": "false"}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


def test_s3_put_with_content_type_checksum_metadata_and_no_acl(aws, make_settings):
    aws.create_bucket(Bucket="archive")
    store = S3Store(make_settings(S3_BUCKET="archive", **BOTO3_ONLY))
    store.check()
    body = png_bytes()
    sha = hashlib.sha256(body).hexdigest()
    key = object_key("p/", "mock", WHEN, "a/b", 1, "image/png")
    assert store.put(key, body, "image/png", sha) is True
    head = aws.head_object(Bucket="archive", Key=key)
    assert head["ContentType"] == "image/png"
    assert head["Metadata"] == {"sha256": sha}
    assert aws.get_object(Bucket="archive", Key=key)["Body"].read() == body
    grants = aws.get_object_acl(Bucket="archive", Key=key)["Grants"]
    assert [g["Permission"] for g in grants] == ["FULL_CONTROL"]  # the owner only: no public-read
    assert "URI" not in grants[0]["Grantee"]
    assert store.url(key) == f"s3://archive/{key}"


def test_s3_same_content_is_not_uploaded_again(aws, make_settings):
    aws.create_bucket(Bucket="archive")
    aws.put_bucket_versioning(Bucket="archive", VersioningConfiguration={"Status": "Enabled"})
    store = S3Store(make_settings(S3_BUCKET="archive", **BOTO3_ONLY))

    def versions() -> int:
        return len(aws.list_object_versions(Bucket="archive", Prefix="k/0.png").get("Versions", []))

    body = png_bytes()
    sha = hashlib.sha256(body).hexdigest()
    assert store.put("k/0.png", body, "image/png", sha) is True and versions() == 1
    assert store.put("k/0.png", body, "image/png", sha) is False and versions() == 1  # refused by If-None-Match
    other = png_bytes(color=(9, 9, 9))
    with pytest.raises(KeyHeld):  # other bytes: kept (another run stored them first)
        store.put("k/0.png", other, "image/png", hashlib.sha256(other).hexdigest())
    assert versions() == 1 and store.read("k/0.png") == body
    assert store.put("k/0.png", other, "image/png", hashlib.sha256(other).hexdigest(), replace=True) is True
    assert versions() == 2 and store.read("k/0.png") == other


def test_s3_store_without_conditional_writes_falls_back_to_plain_puts(aws, make_settings):
    aws.create_bucket(Bucket="archive")
    store = S3Store(make_settings(S3_BUCKET="archive", **BOTO3_ONLY))

    def refuse_conditions(params, **kwargs):
        if "IfNoneMatch" in params:
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no"}}, "PutObject")

    store.client.meta.events.register("provide-client-params.s3.PutObject", refuse_conditions)
    body = png_bytes()
    assert store.put("k/0.png", body, "image/png", hashlib.sha256(body).hexdigest()) is True
    assert store.conditional is False
    assert aws.get_object(Bucket="archive", Key="k/0.png")["Body"].read() == body
    # Without If-None-Match a HEAD first still keeps what is there: the same bytes, or another run's.
    assert store.put("k/0.png", body, "image/png", hashlib.sha256(body).hexdigest()) is False
    other = png_bytes(color=(9, 9, 9))
    with pytest.raises(KeyHeld):
        store.put("k/0.png", other, "image/png", hashlib.sha256(other).hexdigest())
    assert aws.get_object(Bucket="archive", Key="k/0.png")["Body"].read() == body


def test_s3_missing_bucket_is_a_config_error_naming_s3_bucket(aws, make_settings):
    store = S3Store(make_settings(S3_BUCKET="no-such-bucket", **BOTO3_ONLY))
    with pytest.raises(ConfigError, match="S3_BUCKET 'no-such-bucket' does not exist"):
        store.check()


def test_s3_put_into_a_vanished_bucket_is_a_store_error(aws, make_settings):
    store = S3Store(make_settings(S3_BUCKET="gone", **BOTO3_ONLY))
    with pytest.raises(StoreError, match="S3 PUT k/0.png failed"):
        store.put("k/0.png", b"x", "image/png", "0" * 64)


def test_store_from_settings(aws, make_settings, tmp_path: Path):
    assert isinstance(store_from_settings(make_settings()), LocalStore)
    assert isinstance(store_from_settings(make_settings(S3_BUCKET="archive", AWS_REGION="us-east-1")), S3Store)


@pytest.mark.fault("a run killed mid-write left a partial file: the next run's store check removes it")
def test_partial_files_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = LocalStore(tmp_path / "objects")
    store.check()
    leftover = store.incoming / f"{dead.stdout.strip()}-abc.part"
    leftover.write_bytes(b"\x89PNG half")
    ours = store.incoming / f"{os.getpid()}-def.part"
    ours.write_bytes(b"in progress")
    store.check()
    assert not leftover.exists() and ours.exists()
    assert store.put("mock/2024/01/01/1/0.png", b"abc", "image/png", hashlib.sha256(b"abc").hexdigest())
    assert sorted(p.name for p in store.incoming.iterdir()) == [ours.name]  # a put leaves nothing behind


def test_a_store_without_hard_links_still_never_replaces_another_runs_object(tmp_path: Path, monkeypatch):
    # (Found by a hostile review.) On a file system without hard links (vfat/exFAT answer EPERM, a FUSE store ENOSYS, SMB EOPNOTSUPP) put()
    # falls back to os.replace, which is exactly the clobbering the change removed: another run's object, written
    # after this put's lstat and before its rename, is replaced by other bytes, and put() says True (no KeyHeld),
    # so the row records this download while the other run's row records what was there: row and object disagree.
    import errno
    import os as os_module

    import etl.store as store_module

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(store_module.os, "link", no_links)
    red, blue = png_bytes(color=(200, 0, 0)), png_bytes(color=(0, 0, 200))
    key = object_key("", "mock", WHEN, "p1", 0, "image/png")
    a, b = LocalStore(tmp_path / "objects"), LocalStore(tmp_path / "objects")
    a.check()
    os_module.makedirs(a.path(key).parent)  # the post's folder exists (both runs look into it)
    real = store_module._write_renamed
    landed = []

    def other_run_lands_first(fd, tmp, path, body, **kwargs):
        if body == blue and not landed:  # run A stores red between B's lstat and B's write
            landed.append(a.put(key, red, "image/png", hashlib.sha256(red).hexdigest()))
        return real(fd, tmp, path, body, **kwargs)

    monkeypatch.setattr(store_module, "_write_renamed", other_run_lands_first)
    with pytest.raises(KeyHeld):  # B finds A's object: kept, and B records its bytes
        b.put(key, blue, "image/png", hashlib.sha256(blue).hexdigest())
    assert landed == [True]
    assert a.path(key).read_bytes() == red, "run A's object was replaced by other bytes"
