"""Settings: the store URL is validated at start-up, and its scheme is read in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kolors_api.jobs import JobStore, make_store
from kolors_api.settings import Settings


@pytest.mark.parametrize(("url", "fleet"), [
    ("sqlite", False), ("sqlite:///data/kolors.sqlite3", False), ("sqlite:////srv/kolors.sqlite3", False),
    ("redis://127.0.0.1:6379/0", True), ("rediss://user:pw@redis.example:6380/1", True),
    ("unix:///run/redis.sock", True),
])
def test_accepted_store_urls_say_whether_they_are_a_fleet(url: str, fleet: bool) -> None:
    assert Settings(store=url).fleet is fleet


@pytest.mark.parametrize("url", ["postgres://db/x", "", "sqlite:///", "sqlite:/x.db", "SQLITE", "redis:/x",
                                 "memory", " redis://127.0.0.1"])
def test_any_other_store_url_is_refused_naming_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValidationError, match="expected sqlite, sqlite:///PATH, redis://") as refused:
        Settings(store=url)
    assert repr(url) in str(refused.value)


def test_the_store_url_from_the_environment_is_validated_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOLORS_API_STORE", "postgres://db/x")
    with pytest.raises(ValidationError, match="store"):
        Settings()


def test_the_sqlite_path_is_the_url_path_or_the_file_under_data_dir(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).sqlite_path() == tmp_path / "kolors-api.sqlite3"
    assert Settings(store="sqlite:////srv/k.db").sqlite_path() == Path("/srv/k.db")
    assert Settings(store="sqlite:///rel/k.db").sqlite_path() == Path("rel/k.db")


def test_make_store_opens_the_backend_the_settings_name(tmp_path: Path) -> None:
    from kolors_api.jobs.redis import RedisStore
    from kolors_api.jobs.sqlite import SQLiteStore

    store = make_store(Settings(data_dir=tmp_path, retention_seconds=60, max_deliveries=2))
    assert isinstance(store, SQLiteStore) and isinstance(store, JobStore)
    assert (store.path, store.retention, store.max_deliveries) == (tmp_path / "kolors-api.sqlite3", 60, 2)
    redis_store = make_store(Settings(store="redis://127.0.0.1:6379/0", blob_dir=tmp_path / "b"))
    assert isinstance(redis_store, RedisStore) and redis_store.blobs is not None
    assert (redis_store.url, redis_store.blobs.root) == ("redis://127.0.0.1:6379/0", tmp_path / "b")

    with pytest.raises(ValidationError, match="redis://"):
        make_store(Settings(store="postgres://db/x", data_dir=tmp_path))


def test_blob_url_takes_s3_and_file_urls_and_blob_dir_is_its_alias(tmp_path: Path, moto_s3: object) -> None:
    from kolors_api.cli import where_data_lives
    from kolors_api.jobs.blobs import BlobDir
    from kolors_api.jobs.blobs_s3 import S3Blobs
    from kolors_api.jobs.redis import RedisStore
    from kolors_api.jobs.sqlite import SQLiteStore

    assert Settings(blob_dir=tmp_path / "b").blobs_url() == (tmp_path / "b").resolve().as_uri()
    assert Settings(blob_url="s3://bk/p", blob_dir=tmp_path).blobs_url() == "s3://bk/p"  # the URL wins
    assert Settings().blobs_url() is None and Settings(blob_url="").blobs_url() is None
    for bad in ("http://bk/p", "s3://", "file://", "bk/p"):
        with pytest.raises(ValidationError, match=r"expected s3://BUCKET\[/PREFIX\] or file:///PATH"):
            Settings(blob_url=bad)
    embedded = make_store(Settings(data_dir=tmp_path, blob_url="s3://bk/images"))
    assert isinstance(embedded, SQLiteStore) and isinstance(embedded.blobs, S3Blobs)
    assert (embedded.blobs.bucket, embedded.blobs.prefix) == ("bk", "images")
    fleet = make_store(Settings(store="redis://127.0.0.1:6379/0", blob_url=(tmp_path / "f").as_uri()))
    assert isinstance(fleet, RedisStore) and isinstance(fleet.blobs, BlobDir) and fleet.blobs.root == tmp_path / "f"
    line = where_data_lives(Settings(store="redis://:pw@10.0.0.5:6379/0", blob_url="s3://bk/images", worker=False))
    assert line == "store redis://***@10.0.0.5:6379/0 (fleet), images in s3://bk/images; no engine process"
