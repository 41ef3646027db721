#!/usr/bin/env python3
"""Build a real llama.cpp once into the retok cache, from the llama.cpp that the llama-cpp-python sdist on PyPI
vendors (no network beyond the package registry; cmake and a C++ compiler are needed).

    python scripts/build_llamacpp.py        # prints one JSON line: {"bin": ..., "version": ..., "seconds": ...}
    python scripts/build_llamacpp.py -q     # the same, without the build's progress lines

What it builds (CPU only, shared libraries, minimal targets): llama-tokenize, llama-perplexity and
retok-llama (scripts/llamacpp/retok_llama.cpp: greedy decoding through llama.cpp's C API, printing ids and
timings). Idempotent: a second run with the same version, flags and tool source does nothing. About 10
minutes on 2 cores the first time. The binaries go to $RETOK_CACHE/llama.cpp/<version>-<key>/bin
(RETOK_CACHE defaults to ~/.cache/retok).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python on PyPI; vendors llama.cpp (ggml 0.25.3)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TARGETS = ("llama", "llama-tokenize", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",  # binaries find the libraries next to them, wherever the folder goes
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
TOOL = Path(__file__).resolve().parent / "llamacpp" / "retok_llama.cpp"


def cache_root() -> Path:
    return Path(os.environ.get("RETOK_CACHE") or Path.home() / ".cache" / "retok").expanduser()


def build_key() -> str:
    h = hashlib.sha256()
    h.update(VERSION.encode())
    h.update(" ".join(CMAKE_FLAGS + TARGETS).encode())
    return h.hexdigest()[:12]


def build_dir() -> Path:
    return cache_root() / "llama.cpp" / f"{VERSION}-{build_key()}"


def _tool_hash() -> str:
    return hashlib.sha256(TOOL.read_bytes()).hexdigest()


def find_bin() -> Path | None:
    """The bin folder of a finished build for this version/flags whose retok-llama was compiled from the
    current retok_llama.cpp, or None."""
    d = build_dir()
    stamp = d / "bin" / "retok-llama.sha256"
    ok = (d / "done.json").is_file() and stamp.is_file() and stamp.read_text() == _tool_hash()
    return d / "bin" if ok else None


def _run(cmd: list[str], log, quiet: bool) -> None:
    log.write(("$ " + " ".join(cmd) + "\n").encode())
    log.flush()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.stdout is not None
    for line in p.stdout:
        log.write(line)
        text = line.decode(errors="replace").rstrip()
        if not quiet and text.startswith("["):  # cmake's "[ 42%] Building ..." progress
            print(f"[build_llamacpp] {text[:100]}", flush=True)
    if p.wait() != 0:
        raise SystemExit(f"build_llamacpp: `{' '.join(cmd[:3])} ...` failed; see {log.name}")


def _fetch_source(work: Path, log, quiet: bool) -> Path:
    pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q"]
    _run([*pip, "-d", str(work), f"llama-cpp-python=={VERSION}"], log, quiet)
    sdist = work / f"llama_cpp_python-{VERSION}.tar.gz"
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(
            f"build_llamacpp: {sdist.name} has sha256 {digest}, expected {SDIST_SHA256}; not built"
        )
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(work, members=members, filter="data")
    return work / prefix


def _compile_tool(root: Path, log, quiet: bool) -> None:
    """retok-llama against the built libraries and the headers kept next to them (seconds)."""
    bin_dir = root / "bin"
    cmd = ["g++", "-O2", "-std=c++17", "-I", str(root / "include"), str(TOOL), "-L", str(bin_dir)]
    cmd += ["-lllama", "-lggml", "-lggml-base", "-Wl,-rpath,$ORIGIN", "-o", str(bin_dir / "retok-llama")]
    _run(cmd, log, quiet)
    (bin_dir / "retok-llama.sha256").write_text(_tool_hash())


def build(quiet: bool) -> Path:
    done = find_bin()
    if done is not None:
        return done
    final = build_dir()
    log_path = final.parent / f"{final.name}.log"
    if (final / "done.json").is_file():  # llama.cpp is built; only retok_llama.cpp changed
        with log_path.open("ab") as log:
            _compile_tool(final, log, quiet)
        return final / "bin"
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"build_llamacpp: {tool} is not installed; install it (Debian: apt install cmake g++)"
            )
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    if not quiet:
        print(f"[build_llamacpp] building llama.cpp ({VERSION}) once, ~10 min; log: {log_path}", flush=True)
    with log_path.open("wb") as log:
        src = _fetch_source(work, log, quiet)
        b = work / "build"
        _run(["cmake", "-S", str(src), "-B", str(b), *CMAKE_FLAGS], log, quiet)
        _run(["cmake", "--build", str(b), "-j", str(os.cpu_count() or 2), "--target", *TARGETS], log, quiet)
        out = work / "out"
        (out / "bin").mkdir(parents=True)
        (out / "include").mkdir()
        for f in (b / "bin").iterdir():
            if f.name.startswith(("llama-tokenize", "llama-perplexity")) or ".so" in f.name:
                shutil.copy2(f, out / "bin" / f.name, follow_symlinks=False)
        for inc in (src / "include", src / "ggml" / "include"):
            for h in inc.glob("*.h"):
                shutil.copy2(h, out / "include" / h.name)
        _compile_tool(out, log, quiet)
    (out / "done.json").write_text(json.dumps({"version": VERSION, "flags": CMAKE_FLAGS, "targets": TARGETS}))
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    return final / "bin"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args()
    start = time.time()
    bin_dir = build(args.quiet)
    print(json.dumps({"bin": str(bin_dir), "version": VERSION, "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
