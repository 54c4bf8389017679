"""The export formats by name: what ``--format`` (``scripts/export.py``) and
``remote_train --export`` accept.

A new format is one module with a class that follows ``ExportFormat`` (``src/export/format.py``)
and one line below (or a ``register_format`` call from the code that defines it).
Importing this module imports no torch, onnx, onnxruntime, transformers or peft.
"""

from __future__ import annotations

from src.export.errors import ExportError
from src.export.format import ExportFormat
from src.export.hf.format import HfFormat
from src.export.onnx.format import OnnxFormat

_FORMATS: dict[str, type[ExportFormat]] = {OnnxFormat.name: OnnxFormat, HfFormat.name: HfFormat}


def register_format(format_class: type[ExportFormat]) -> None:
    """Make ``format_class.name`` a format (registering a name again replaces it)."""
    _FORMATS[format_class.name] = format_class


def format_names() -> list[str]:
    return list(_FORMATS)


def format_class(name: str) -> type[ExportFormat]:
    """The class registered as ``name``; ExportError naming the known formats if none is."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ExportError(
            f"no export format {name!r}: choose one of {', '.join(_FORMATS)}"
        ) from None


def resolve_format(fmt: str | ExportFormat) -> ExportFormat:
    """A format name (its default options) or an instance (``OnnxFormat(int8=True)``,
    ``HfFormat(merge=True)``)."""
    return format_class(fmt)() if isinstance(fmt, str) else fmt
