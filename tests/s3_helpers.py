"""A real S3 endpoint on loopback for the tests: moto's server mode, on a free port.

The stores, servers and workers under test reach it through the production code (boto3 with the
standard AWS_* settings, which `moto_s3` puts in this process's environment, so the processes the
tests start inherit them).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import free_port

#: Fake credentials moto accepts; the endpoint is added per server.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@dataclass
class MotoS3:
    """A running moto S3 server: `env` points boto3 at it; `bucket()` makes a fresh bucket."""

    server: Any
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                              aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> str:
        """A new, empty bucket; its name."""
        name = f"kolors-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        """Start (again, on the same port: the buckets live in this process and survive a stop)."""
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: no line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


def start_moto(port: int | None = None) -> MotoS3:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    s3 = MotoS3(server=None, port=port or free_port())
    s3.start()
    return s3


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One moto S3 server for the session, with AWS_* set in this process (and so in its children)."""
    s3 = start_moto()
    saved = {name: os.environ.get(name) for name in (*s3.env, "AWS_ENDPOINT_URL_S3")}
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.update(s3.env)
    yield s3
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    s3.stop()


@pytest.fixture
def s3_url(moto_s3: MotoS3) -> str:
    """`s3://<a new bucket>/outputs`: a blob URL of this test's own."""
    return f"s3://{moto_s3.bucket()}/outputs"
