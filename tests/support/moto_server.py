"""moto's S3 server on 127.0.0.1 and a free port: boto3 talks real HTTP to it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from moto.server import ThreadedMotoServer

from tests.support.sshd import free_port

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIATESTSECRETID0001",
    "AWS_SECRET_ACCESS_KEY": "test-secret-access-key-must-not-leak-42",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class MotoS3:
    endpoint_url: str

    def client(self):  # noqa: ANN201 - a boto3 S3 client
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )


@contextlib.contextmanager
def running_moto_s3() -> Iterator[MotoS3]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield MotoS3(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
