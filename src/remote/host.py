"""The host as remote_train sees it: the open SSH session, where the code lives there, and
the interpreter that runs the agent (``src/remote/agent.py``) and the experiments."""

from __future__ import annotations

import json
import shlex
import subprocess
import tempfile
from typing import Any, BinaryIO

from src.remote.stages import StageError
from src.storage.output_sync import SshSession


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


class RemoteHost:
    def __init__(
        self, session: SshSession, remote_dir: str, python: str, tmux_socket: str | None = None
    ) -> None:
        self.session = session
        self.remote_dir = remote_dir
        self.python = python
        self.tmux_socket = tmux_socket

    def in_repo(self, command: str) -> str:
        """``command`` run from the code's folder on the host."""
        return f"cd -- {shlex.quote(self.remote_dir)} && {command}"

    def agent_command(self, *args: str) -> str:
        parts = [self.python, "-m", "src.remote.agent"]
        parts += ["--tmux-socket", self.tmux_socket] if self.tmux_socket else []
        return self.in_repo(shlex.join([*parts, *args]))

    def agent_json(
        self, stage: str, *args: str, stdin: bytes | None = None, timeout: float = 120
    ) -> Any:
        """The agent's JSON answer; StageError(stage) with its one-line error otherwise."""
        try:
            result = self.session.run(self.agent_command(*args), timeout=timeout, input=stdin)
        except subprocess.TimeoutExpired:
            raise StageError(stage, f"the host did not answer within {timeout:g} s") from None
        if result.returncode == 255:
            raise StageError(stage, f"SSH connection dropped: {_last_line(result.stderr)}")
        if result.returncode != 0:
            message = _last_line(result.stderr) or f"exit code {result.returncode}"
            if "No module named" in message or "not found" in message and self.python in message:
                message += f" (is --python {self.python} right, and was the install stage run?)"
            raise StageError(stage, message)
        answer = _last_line(result.stdout)
        try:
            return json.loads(answer)
        except ValueError:
            raise StageError(stage, f"unexpected answer from the host: {answer!r}") from None

    def stream(self, command: str, sink: BinaryIO) -> tuple[int, str]:
        """Run ``command`` on the host, copying its stdout to ``sink`` as it comes;
        (exit code, ssh's last stderr line). KeyboardInterrupt stops the local side only."""
        with tempfile.TemporaryFile() as err:
            process = self.session.popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
            assert process.stdout is not None
            try:
                while chunk := process.stdout.read1(65536):
                    sink.write(chunk)
                    sink.flush()
                code = process.wait()
            except BaseException:
                process.kill()
                process.wait()
                raise
            err.seek(0)
            return code, _last_line(err.read())
