"""A fake Hugging Face Hub serving dataset repos on 127.0.0.1, for the real ``datasets`` and
``huggingface_hub`` clients: repo info, auth check, file tree and paths-info, and file bytes
(ranges included, as ``HfFileSystem`` reads them). Gated repos answer 403 ``GatedRepo`` without the
token, private ones 404 ``RepositoryNotFound``, as the Hub does. Every request is recorded, so a
test can tell which files were fetched (the form's check must fetch no rows).
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

TOKEN = "hf_fakeDATASETtoken0987654321"
SHA = "a" * 40


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


class DatasetHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict] = {}  # id -> {"files": {path: bytes}, "private": bool, "gated": bool}
        self.requests: list[tuple[str, str]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def add(self, repo_id: str, files: dict[str, bytes | str], private: bool = False, gated: bool = False) -> None:
        self.repos[repo_id] = {"files": {k: v.encode() if isinstance(v, str) else v for k, v in files.items()},
                               "private": private, "gated": gated}

    def fetched(self) -> list[str]:
        """Paths of the files served whole (GET .../resolve/... without a Range), in order; a
        ranged read (a Parquet footer read for its schema) is recorded as a "RANGE" request."""
        from collections import Counter
        ranged, out = Counter(p for m, p in self.requests if m == "RANGE"), []
        for method, path in self.requests:
            if method == "GET" and "/resolve/" in path:
                if ranged[path]:
                    ranged[path] -= 1
                else:
                    out.append(path)
        return out

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: DatasetHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, body, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(body).encode(), headers, head)

    def _repo(self, repo_id: str, head: bool = False) -> dict | None:
        """The repo if this request may read it; else the Hub's refusal is sent and None returned."""
        repo = self.server.repos.get(repo_id)
        authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        if repo is None or (repo["private"] and not authorized):
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
            return None
        if repo["gated"] and not authorized:
            self._json(403, {"error": f"Access to dataset {repo_id} is restricted. You must have access to it "
                                      "and be authenticated to access it. Please log in."},
                       {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this dataset is restricted"},
                       head)
            return None
        return repo

    def _entries(self, repo: dict, prefix: str, recursive: bool) -> list[dict]:
        files, out, dirs = repo["files"], [], set()
        prefix = prefix.strip("/")
        for path in sorted(files):
            if prefix and not (path == prefix or path.startswith(prefix + "/")):
                continue
            rest = path[len(prefix) + 1:] if prefix and path != prefix else path
            parts = rest.split("/")
            if not recursive and len(parts) > 1:
                dirs.add(f"{prefix}/{parts[0]}" if prefix else parts[0])
                continue
            if recursive:
                for i in range(1, len(parts)):
                    dirs.add("/".join(([prefix] if prefix else []) + parts[:i]))
            out.append(self._file_entry(path, files[path]))
        return [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()}
                for d in sorted(dirs)] + out

    @staticmethod
    def _file_entry(path: str, data: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                "lastCommit": {"id": SHA, "title": "upload", "date": "2026-01-01T00:00:00.000Z"}}

    def _route(self, head: bool) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            repo_id = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            if rest == ["auth-check"]:
                if self._repo(repo_id, head) is not None:
                    self._json(200, {}, head=head)
                return
            repo = self.server.repos.get(repo_id)
            if not rest or rest[0] == "revision":  # repo info: public metadata of a gated repo included
                if repo is None or (repo["private"] and self.headers.get("Authorization") != f"Bearer {TOKEN}"):
                    self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
                    return
                self._json(200, {"id": repo_id, "sha": SHA, "private": repo["private"],
                                 "gated": "auto" if repo["gated"] else False, "disabled": False,
                                 "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0,
                                 "siblings": [{"rfilename": f} for f in sorted(repo["files"])]}, head=head)
                return
            if rest[0] == "tree" and (repo := self._repo(repo_id, head)) is not None:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                self._json(200, self._entries(repo, "/".join(rest[2:]), recursive), head=head)
                return
            if rest[0] == "tree":
                return
        if len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
            repo = self._repo(f"{parts[1]}/{parts[2]}", head)
            if repo is None:
                return
            name = "/".join(parts[5:])
            if name not in repo["files"]:
                self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head)
                return
            data = repo["files"][name]
            headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes=") and not head:
                self.server.requests.append(("RANGE", self.path))
                start_s, _, end_s = ranged[len("bytes="):].partition("-")
                if start_s == "":  # a suffix: the last N bytes
                    start, end = max(0, len(data) - int(end_s)), len(data) - 1
                else:
                    start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
                self._send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})
                return
            self._send(200, data, headers, head)
            return
        self._json(404, {"error": "not found"}, head=head)

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        self._route(head=False)

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path))
        self._route(head=True)

    def do_POST(self):
        self.server.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] == "paths-info":
            repo = self._repo(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return
            try:
                wanted = json.loads(body)["paths"]
            except ValueError:
                wanted = parse_qs(body.decode()).get("paths", [])
            out = []
            for path in wanted:
                path = path.strip("/")
                if path in repo["files"]:
                    out.append(self._file_entry(path, repo["files"][path]))
                elif any(f.startswith(path + "/") for f in repo["files"]) or path == "":
                    out.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()})
            self._json(200, out)
            return
        self._json(404, {"error": "not found"})
