"""What every provider's machines share: their SSH addresses and how long they have run."""

from __future__ import annotations

from dataclasses import dataclass

TENSORBOARD_FORWARD = "-L 8080:localhost:6006"  # `make tensorboard` on the laptop's :8080


@dataclass(frozen=True)
class SshAddress:
    """``direct`` is the machine's own IP and mapped port (faster); ``proxy`` goes via Vast.ai."""

    kind: str
    host: str
    port: int
    user: str = "root"

    def command(self, forward_tensorboard: bool = True) -> str:
        extra = f" {TENSORBOARD_FORWARD}" if forward_tensorboard else ""
        return f"ssh -p {self.port} {self.user}@{self.host}{extra}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return f"{days}d {hours}h{minutes:02d}m" if days else f"{hours}h{minutes:02d}m"
