"""moto's S3 server on 127.0.0.1 and a free port: boto3 talks real HTTP to it.

Clients reach it through a small TCP relay on another port, so a test can cut the network
for real: ``stop()`` closes the relay's listener and every open connection (keep-alive ones
too), and clients get "connection refused" until ``start()``; moto and its buckets live on.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.request
from collections.abc import Iterator

from tests.support.sshd import free_port

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIATESTSECRETID0001",
    "AWS_SECRET_ACCESS_KEY": "test-secret-access-key-must-not-leak-42",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class _Relay:
    """Forwards 127.0.0.1:<port> to the moto server; can drop everything at once."""

    def __init__(self, port: int, target_port: int) -> None:
        self.port, self.target_port = port, target_port
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class MotoS3:
    def __init__(self) -> None:
        self.server_port = free_port()
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        # Imported here so a test module that also holds GPU tests collects on a GPU box
        # without moto (make gpu-check); every S3 test still needs it.
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(
            ip_address="127.0.0.1", port=self.server_port, verbose=False
        )
        self._relay = _Relay(self.port, self.server_port)

    def client(self):  # noqa: ANN201 - a boto3 S3 client
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )

    def reset(self) -> None:
        """Forget every bucket (moto's state lives in this process, shared by servers)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        """An outage: connections drop and new ones are refused; the buckets stay."""
        self._relay.stop()

    def start(self) -> None:
        self._relay.start()


@contextlib.contextmanager
def running_moto_s3() -> Iterator[MotoS3]:
    s3 = MotoS3()
    s3._server.start()
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()
        s3._server.stop()
