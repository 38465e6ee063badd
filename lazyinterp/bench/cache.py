"""Finished runs of an interrupted benchmark, kept so that the same command resumes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..fetch import atomic_path, cache_dir
from .report import json_safe, write_text

Tensor = torch.Tensor


class RunCache:
    """Finished runs of an interrupted benchmark, so that the next run of the same command resumes.

    One folder per configuration (workload, n, seed, reference NFE, model file, device type, package versions,
    lazyinterp's source) under ``root``: ``reference.json`` and ``reference.safetensors`` (the reference samples,
    for path errors) and one ``run-<sampler>-<nfe>.json`` per finished (sampler, NFE). Every file is written
    atomically, and only by rank 0, which shares what it read with the other ranks.
    """

    def __init__(self, root: Path | str, manifest: dict[str, Any]):
        text = json.dumps(manifest, sort_keys=True)
        self.folder = Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.manifest = json.loads(text)

    def _run_path(self, sampler: str, nfe: int) -> Path:
        return self.folder / f"run-{sampler}-{nfe}.json"

    def load(self) -> tuple[dict | None, Tensor | None, dict[tuple[str, int], dict]]:
        """The cached reference entry and samples, and the cached runs by (sampler, NFE)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        reference, samples, runs = None, None, {}
        try:
            if (self.folder / "reference.json").is_file():
                samples = load_file(self.folder / "reference.safetensors")["samples"]
                reference = json.loads((self.folder / "reference.json").read_text())
            for path in self.folder.glob("run-*.json"):
                entry = json.loads(path.read_text())
                runs[(entry["sampler"], int(entry["nfe"]))] = entry
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise ValueError(f"work_dir: {self.folder} holds unreadable results ({exc}); remove it or pass "
                             "--fresh") from None
        return reference, samples, runs

    def start(self, fresh: bool) -> None:
        """Create the folder and its manifest (after removing what it holds, with ``fresh``)."""
        if fresh:
            self.remove()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(self.manifest, indent=1, sort_keys=True) + "\n", self.folder / "manifest.json")

    def save_reference(self, entry: dict, samples: Tensor) -> None:
        """Keep the reference run and its samples (for the path errors of later runs)."""
        from safetensors.torch import save_file

        with atomic_path(self.folder / "reference.safetensors") as tmp:
            save_file({"samples": samples.detach().cpu().contiguous()}, str(tmp))
        write_text(json.dumps(entry) + "\n", self.folder / "reference.json")

    def save_run(self, entry: dict) -> None:
        """Keep one finished (sampler, NFE) run."""
        write_text(json.dumps(json_safe(entry)) + "\n", self._run_path(entry["sampler"], entry["nfe"]))

    def remove(self) -> None:
        """Delete the folder and everything cached in it."""
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                path.unlink()
            self.folder.rmdir()


def code_identity(package: Path | str | None = None) -> str:
    """sha256 of the source files under ``package`` (default lazyinterp's own, subpackages included), each with
    its relative path: runs cached by other code are never resumed."""
    package = Path(__file__).resolve().parents[1] if package is None else Path(package)
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def default_work_dir() -> Path:
    """Where an interrupted benchmark keeps its finished runs: ``<cache>/bench``."""
    return cache_dir() / "bench"
