"""moto's S3 server on loopback for the S3 benchmarks (real HTTP, in this process)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def moto_bucket(bucket: str) -> Iterator[tuple[str, Any]]:
    """Start the server, create ``bucket``; yields (endpoint_url, a boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.support.sshd import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    try:
        yield endpoint, client
    finally:
        server.stop()
