"""``HfFormat``: a PEFT run's adapter as Hugging Face files in ``<run>/export_hf/``, with
``--merge`` a merged model checked against the adapter model, with ``--gguf`` a GGUF file.

    export_hf/
        adapter/                  always: best_adapter/ (or final_adapter/), byte for byte
        merged/                   --merge: config.json, generation_config.json,
                                  model*.safetensors (+ index when sharded), tokenizer files
        <run_name>-<type>.gguf    --gguf: llama.cpp's converter on merged/
    export_hf.json                the sidecar: every file's sha256 and size, the check

The pipeline stages ``export_hf/`` under a hidden temp name and renames it into place whole
when every check passed, so the directory is always one export's output, never a mix.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from src.common.atomic_io import sha256_file
from src.export.errors import CheckFailedError, ExportError
from src.export.format import ADAPTER, AdapterRun, Log
from src.export.hf.gguf import GGUF_TYPES, LLAMA_CPP_ENV, convert, find_converter
from src.runs.layout import RunLayout

HF_EXPORT = "export_hf"  # the export's directory in the run directory
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
DTYPE_CHOICES = ("bf16", "fp16", "fp32")
# Default --tolerance per --dtype: max |merged - adapter model| / max |adapter model logit|.
# Merging rounds W + BA to the dtype once, where the adapter model adds BAx to Wx in it:
# about 1e-6 in fp32, 1e-3 in fp16 and 1-2e-2 in bf16 (8 mantissa bits) on the tiny Llama;
# a wrong merge moves logits by the adapter's whole effect, typically the logits' own size.
TOLERANCES = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-4}
MAX_SHARD_SIZE = "5GB"


def gguf_name(run_name: str, gguf_type: str) -> str:
    return f"{run_name}-{gguf_type}.gguf"


def copy_adapter(source: Path, destination: Path) -> list[str]:
    """Copy the adapter's files and check each copy's sha256; the names copied."""
    destination.mkdir()
    names = []
    for path in sorted(source.iterdir()):
        if not path.is_file():
            continue
        shutil.copyfile(path, destination / path.name)
        if sha256_file(destination / path.name) != sha256_file(path):
            raise CheckFailedError(f"the copy of {path} differs from it (disk or filesystem?)")
        names.append(path.name)
    return names


@dataclass(frozen=True)
class HfFormat:
    """The ``hf`` export and its options (``scripts/export.py --format hf`` flags)."""

    name: ClassVar[str] = "hf"
    source: ClassVar[str] = ADAPTER
    merge: bool = False  # also merged/: the base with the adapter merged in
    dtype: str = "bf16"  # the merged model's dtype
    tolerance: float | None = None  # None: TOLERANCES[dtype]
    max_shard_size: str = MAX_SHARD_SIZE
    gguf: bool = False  # also <run_name>-<gguf_type>.gguf (implies merge)
    gguf_type: str = "f16"
    llama_cpp: str | None = None  # a llama.cpp checkout; None: $LLAMA_CPP_DIR

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ExportError(f"--dtype {self.dtype!r}: choose {', '.join(DTYPE_CHOICES)}")
        if self.gguf_type not in GGUF_TYPES:
            raise ExportError(f"--gguf-type {self.gguf_type!r}: choose {', '.join(GGUF_TYPES)}")
        if self.tolerance is not None and not self.tolerance >= 0:
            raise ExportError(f"--tolerance {self.tolerance}: a number >= 0")
        if self.gguf and not self.merge:
            object.__setattr__(self, "merge", True)  # llama.cpp converts a merged model

    @property
    def check_tolerance(self) -> float:
        return TOLERANCES[self.dtype] if self.tolerance is None else self.tolerance

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--merge",
            action="store_true",
            help="also export_hf/merged/: the base with the adapter merged in, checked against "
            "the adapter model",
        )
        parser.add_argument(
            "--dtype",
            choices=DTYPE_CHOICES,
            default="bf16",
            help="the merged model's dtype; a 4-bit (QLoRA) base is reloaded in it, never "
            "merged in 4-bit (default %(default)s)",
        )
        parser.add_argument(
            "--tolerance",
            type=float,
            default=None,
            help="max |merged - adapter model| / max |logit| (default: "
            + ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items())
            + ")",
        )
        parser.add_argument(
            "--max-shard-size",
            default=MAX_SHARD_SIZE,
            help="largest safetensors shard of the merged model (default %(default)s)",
        )
        parser.add_argument(
            "--gguf",
            action="store_true",
            help="also export_hf/<run_name>-<type>.gguf with llama.cpp (implies --merge)",
        )
        parser.add_argument(
            "--gguf-type",
            choices=GGUF_TYPES,
            default="f16",
            help="convert_hf_to_gguf.py --outtype (default %(default)s)",
        )
        parser.add_argument(
            "--llama-cpp",
            metavar="DIR",
            default=None,
            help=f"a llama.cpp checkout (default: ${LLAMA_CPP_ENV})",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HfFormat:
        return cls(
            merge=args.merge,
            dtype=args.dtype,
            tolerance=args.tolerance,
            max_shard_size=args.max_shard_size,
            gguf=args.gguf,
            gguf_type=args.gguf_type,
            llama_cpp=args.llama_cpp,
        )

    def targets(self, layout: RunLayout) -> list[Path]:
        return [layout.root / HF_EXPORT]

    def write(
        self, run: AdapterRun, staged: Mapping[Path, Path], log: Log
    ) -> dict[Path, dict[str, Any]]:
        target = next(iter(staged))
        out = staged[target]
        # The converter is looked for first: without llama.cpp, nothing is loaded or written.
        converter = find_converter(self.llama_cpp) if self.gguf else None
        out.mkdir()
        copied = copy_adapter(run.adapter_dir, out / ADAPTER_DIR)
        log(f"adapter: {run.adapter_dir.name}/ -> {HF_EXPORT}/{ADAPTER_DIR}/ ({len(copied)} files)")
        meta: dict[str, Any] = {
            "hf": {"adapter": {"dir": ADAPTER_DIR, "from": run.adapter_dir.name}},
        }
        if not self.merge:
            return {target: meta}

        from src.export.hf.merge import merge_and_check  # lazy: transformers+peft, --merge only

        merged = merge_and_check(
            run,
            out / MERGED_DIR,
            self.dtype,
            self.check_tolerance,
            self.max_shard_size,
            log,
        )
        meta["hf"]["merged"] = merged
        if converter is not None:
            run_name = run.config.get("run_name") or run.run_dir.name
            outfile = out / gguf_name(run_name, self.gguf_type)
            meta["hf"]["gguf"] = convert(converter, out / MERGED_DIR, outfile, self.gguf_type, log)
        return {target: meta}
