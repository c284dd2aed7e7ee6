"""A small, protocol-faithful Hugging Face Hub for tests, served on 127.0.0.1.

It implements the part of the Hub's HTTP API that ``huggingface_hub`` and ``datasets``
use to create repos and branches, upload (preupload, the LFS batch API with basic transfer,
ndjson commits), list (``tree``, ``paths-info``, repo info) and download (``resolve`` with
HEAD, ranges and the X-Repo-Commit / X-Linked-* headers). Repos live in memory; tokens are
checked (private repos need one) and never echoed.

Run: ``python tests/hub_server.py`` prints the port it listens on, then serves until killed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

TOKEN = "hf_uge_test_token"
USER = "tester"
LFS_THRESHOLD = 1024  # files above this size (or binary) go through LFS, as on the Hub

lock = threading.Lock()
repos: dict[tuple[str, str], dict] = {}  # (type, id) -> {"private", "branches": {name: sha}, "commits": {sha: {path: entry}}}
lfs_store: dict[str, bytes] = {}  # sha256 -> content


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def new_commit_sha(*parts: str) -> str:
    return hashlib.sha1(("/".join(parts) + str(time.time_ns())).encode()).hexdigest()


def entry_json(path: str, entry: dict) -> dict:
    out = {"type": "file", "path": path, "oid": entry["blob"], "size": entry["size"]}
    if entry.get("lfs"):
        out["lfs"] = {"oid": entry["lfs"], "size": entry["size"], "pointerSize": 134}
    return out


def content_of(entry: dict) -> bytes:
    return lfs_store[entry["lfs"]] if entry.get("lfs") else entry["content"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # -- helpers -------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://{self.headers['Host']}"

    def authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {TOKEN}"

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None, head: bool = False):
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def error(self, status: int, message: str, code: str | None = None, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self.send(status, {"error": message}, headers, head=head)

    def repo(self, kind: str, repo_id: str, head: bool = False, write: bool = False):
        repo = repos.get((kind, repo_id))
        if repo is None or (repo["private"] and not self.authorized()):
            self.error(404, "Repository not found", "RepoNotFound", head)
            return None
        if write and not self.authorized():
            self.error(401, "Invalid credentials in Authorization header", head=head)
            return None
        return repo

    def commit_of(self, repo: dict, revision: str, head: bool = False):
        revision = unquote(revision)
        sha = repo["branches"].get(revision, revision if revision in repo["commits"] else None)
        if sha is None:
            self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head)
        return sha

    # -- routing -------------------------------------------------------------------------
    def do_HEAD(self):
        self.route("HEAD")

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def route(self, method: str):
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        kinds = "(models|datasets|spaces)"
        rid = r"([^/]+/[^/]+|[^/]+)"
        with lock:
            if path == "/api/whoami-v2":
                return self.send(200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}}) \
                    if self.authorized() else self.error(401, "Invalid credentials in Authorization header")
            if path == "/api/validate-yaml" and method == "POST":
                return self.validate_yaml(json.loads(self.body()))
            if path == "/api/repos/create" and method == "POST":
                return self.create_repo(json.loads(self.body()))
            if m := re.fullmatch(rf"/api/{kinds}/{rid}/preupload/(.+)", path):
                return self.preupload(m[1][:-1], m[2], m[3])
            if m := re.fullmatch(rf"/api/{kinds}/{rid}/commit/(.+)", path):
                return self.commit(m[1][:-1], m[2], m[3])
            if m := re.fullmatch(rf"/api/{kinds}/{rid}/branch/(.+)", path):
                return self.branch(m[1][:-1], m[2], m[3])
            if m := re.fullmatch(rf"/api/{kinds}/{rid}/tree/([^/]+)(/.*)?", path):
                return self.tree(m[1][:-1], m[2], m[3], (m[4] or "").strip("/"), "recursive" in query and query["recursive"][0] in ("1", "true", "True"))
            if m := re.fullmatch(rf"/api/{kinds}/{rid}/paths-info/(.+)", path):
                return self.paths_info(m[1][:-1], m[2], m[3])
            if m := re.fullmatch(rf"/api/{kinds}/{rid}/revision/(.+)", path):
                return self.info(m[1][:-1], m[2], m[3], method == "HEAD")
            if m := re.fullmatch(rf"/api/{kinds}/{rid}", path):
                return self.info(m[1][:-1], m[2], "main", method == "HEAD")
            if m := re.fullmatch(r"/(datasets/|spaces/)?(.+)\.git/info/lfs/objects/batch", path):
                return self.lfs_batch((m[1] or "models/").rstrip("s/") or "model", m[2])
            if m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
                return self.lfs_upload(m[1])
            if m := re.fullmatch(rf"/(datasets/|spaces/)?{rid}/resolve/([^/]+)/(.+)", path):
                kind = {"datasets/": "dataset", "spaces/": "space"}.get(m[1] or "", "model")
                return self.resolve(kind, m[2], m[3], m[4], method == "HEAD")
        self.error(404, f"no route for {method} {path}", head=method == "HEAD")

    # -- repos -----------------------------------------------------------------------------
    def create_repo(self, payload: dict):
        if not self.authorized():
            return self.error(401, "Invalid credentials in Authorization header")
        kind = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.base}/{'' if kind == 'model' else kind + 's/'}{repo_id}"
        if (kind, repo_id) in repos:
            return self.send(409, {"error": "You already created this repo", "url": url})
        root = new_commit_sha(kind, repo_id)
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repos[(kind, repo_id)] = {"private": private, "branches": {"main": root}, "commits": {root: {}}}
        self.send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, payload: dict):
        """The card's YAML header must parse to a mapping whose standard fields have the right shape."""
        import yaml

        match = re.match(r"^---\n(.*?)\n---\n", payload.get("content", ""), re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else {}
            if not isinstance(meta, dict):
                raise ValueError("the YAML header is not a mapping")
            for field in ("tags", "task_categories", "size_categories"):
                if field in meta and not isinstance(meta[field], (list, str)):
                    raise ValueError(f"'{field}' must be a string or a list of strings")
        except Exception as error:
            return self.send(400, raw=f"Invalid metadata in README.md: {error}".encode())
        self.send(200, {"errors": [], "warnings": []})

    def branch(self, kind: str, repo_id: str, name: str):
        repo = self.repo(kind, repo_id, write=True)
        if repo is None:
            return
        payload = json.loads(self.body() or b"{}")
        if name in repo["branches"]:
            return self.send(409, {"error": f"Branch {name} already exists"})
        start = payload.get("startingPoint") or "main"
        repo["branches"][name] = repo["branches"].get(start, start)
        self.send(200, {})

    def info(self, kind: str, repo_id: str, revision: str, head: bool):
        repo = self.repo(kind, repo_id, head)
        if repo is None:
            return
        sha = self.commit_of(repo, revision, head)
        if sha is None:
            return
        files = repo["commits"][sha]
        self.send(200, {"id": repo_id, "_id": repo_id, "sha": sha, "private": repo["private"], "disabled": False, "gated": False,
                        "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                        "author": repo_id.split("/")[0], "siblings": [{"rfilename": p} for p in sorted(files)]}, head=head)

    # -- upload ----------------------------------------------------------------------------
    def preupload(self, kind: str, repo_id: str, revision: str):
        repo = self.repo(kind, repo_id, write=True)
        if repo is None:
            return
        sha = self.commit_of(repo, revision)
        if sha is None:
            return
        current = repo["commits"][sha]
        files = []
        for f in json.loads(self.body())["files"]:
            sample = base64.b64decode(f["sample"])
            binary = b"\0" in sample or f["path"].endswith((".parquet", ".safetensors", ".arrow", ".png"))
            mode = "lfs" if binary or f["size"] > LFS_THRESHOLD else "regular"
            existing = current.get(f["path"])
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": existing["blob"] if existing else None})
        self.send(200, {"files": files, "commitOid": sha})

    def lfs_batch(self, kind: str, repo_id: str):
        repo = self.repo(kind, repo_id, write=True)
        if repo is None:
            return
        payload = json.loads(self.body())
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in lfs_store:
                item["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{obj['oid']}"}}
            objects.append(item)
        self.send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_upload(self, oid: str):
        data = self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, "content does not match its oid")
        lfs_store[oid] = data
        self.send(200, {})

    def commit(self, kind: str, repo_id: str, revision: str):
        repo = self.repo(kind, repo_id, write=True)
        if repo is None:
            return
        branch = unquote(revision)
        if branch not in repo["branches"]:
            return self.error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo["commits"][repo["branches"][branch]])
        for line in self.body().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                content = base64.b64decode(value["content"])
                files[value["path"]] = {"blob": git_blob_sha(content), "size": len(content), "content": content}
            elif key == "lfsFile":
                if value["oid"] not in lfs_store:
                    return self.error(422, f"LFS object {value['oid']} was never uploaded")
                content = lfs_store[value["oid"]]
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {len(content)}\n".encode()
                files[value["path"]] = {"blob": git_blob_sha(pointer), "size": len(content), "lfs": value["oid"]}
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: e for p, e in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        sha = new_commit_sha(kind, repo_id, branch)
        repo["commits"][sha] = files
        repo["branches"][branch] = sha
        prefix = "" if kind == "model" else f"{kind}s/"
        self.send(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.base}/{prefix}{repo_id}/commit/{sha}"})

    # -- listing and download --------------------------------------------------------------
    def tree(self, kind: str, repo_id: str, revision: str, folder: str, recursive: bool):
        repo = self.repo(kind, repo_id)
        if repo is None or (sha := self.commit_of(repo, revision)) is None:
            return
        files, out, dirs = repo["commits"][sha], [], set()
        prefix = folder + "/" if folder else ""
        if folder and not any(p.startswith(prefix) for p in files):
            return self.error(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                d = prefix + "/".join(rest[:depth])
                if d not in dirs and (recursive or depth == 1):
                    dirs.add(d)
                    out.append({"type": "directory", "path": d, "oid": git_blob_sha(d.encode()), "size": 0})
            if recursive or len(rest) == 1:
                out.append(entry_json(path, files[path]))
        self.send(200, out)

    def paths_info(self, kind: str, repo_id: str, revision: str):
        repo = self.repo(kind, repo_id)
        if repo is None or (sha := self.commit_of(repo, revision)) is None:
            return
        raw = self.body()
        form = json.loads(raw) if self.headers.get("Content-Type", "").startswith("application/json") else parse_qs(raw.decode())
        paths = form.get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        files, out = repo["commits"][sha], []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(entry_json(p, files[p]))
            elif any(f.startswith(p + "/") for f in files):
                out.append({"type": "directory", "path": p, "oid": git_blob_sha(p.encode()), "size": 0})
        self.send(200, out)

    def resolve(self, kind: str, repo_id: str, revision: str, path: str, head: bool):
        repo = self.repo(kind, repo_id, head)
        if repo is None or (sha := self.commit_of(repo, revision, head)) is None:
            return
        entry = repo["commits"][sha].get(path)
        if entry is None:
            return self.error(404, f"{path} does not exist on {revision}", "EntryNotFound", head)
        content = content_of(entry)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.get("lfs") or entry["blob"]}"', "Accept-Ranges": "bytes"}
        if entry.get("lfs"):
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]}"', "X-Linked-Size": str(len(content))})
        status = 200
        if (rng := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())):
            start = int(m[1]) if m[1] else max(0, len(content) - int(m[2]))
            end = min(int(m[2]), len(content) - 1) if m[1] and m[2] else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start:end + 1], 206
        self.send(status, raw=content, headers=headers, head=head)


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
