#!/usr/bin/env python3
"""A read-only ListObjectsV2 endpoint for the audit benchmark (not a test double: tests use s3s-fs).

s3s-fs walks its whole data directory for every listing page, so listing 5,000,000 objects from it
would take hours; this server answers listing pages of a generated, sorted key set instead, so the
benchmark measures the audit, not the server. Keys: for media i in 1..N, id = md5(i)[:24];
`PREFIX/local_content/AB/CD/REST` and 4 thumbnails under `PREFIX/local_thumbnails/AB/CD/REST/`,
minus every 100th media (lost), plus M orphans. Same generator as scripts/bench-audit.sh's SQL.

Also answers a `prefix=` filter, DELETE (the key leaves the set) and HEAD, for the prune
benchmark; `GET /__requests` returns the request counts so far (JSON), by method, and
`GET /__reset` brings every deleted key back (each path starts from the same bucket).

usage: list_server.py PORT N ORPHANS PREFIX
"""
import bisect
import collections
import hashlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse
from xml.sax.saxutils import escape

port, n, orphans, prefix = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
THUMBS = ["32-32-image-jpeg-crop", "96-96-image-jpeg-crop", "320-240-image-jpeg-scale", "640-480-image-jpeg-scale"]


def split(mid):
    return f"{mid[:2]}/{mid[2:4]}/{mid[4:]}"


keys = []
for i in range(1, n + 1):
    if i % 100 == 0:
        continue  # lost: in the database, not in the bucket
    s = split(hashlib.md5(str(i).encode()).hexdigest()[:24])
    keys.append(f"{prefix}local_content/{s}")
    keys.extend(f"{prefix}local_thumbnails/{s}/{t}" for t in THUMBS)
for i in range(orphans):
    s = split(hashlib.md5(f"orphan{i}".encode()).hexdigest()[:24])
    keys.append(f"{prefix}local_content/{s}")
keys.sort(key=lambda k: k.encode())
print(f"list_server: {len(keys)} keys on 127.0.0.1:{port}", flush=True)
deleted = set()
counts = collections.Counter()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, code, body=b"", ctype="application/xml"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_DELETE(self):
        counts["DELETE"] += 1
        key = urlparse(self.path).path.split("/", 2)[2]
        from urllib.parse import unquote
        deleted.add(unquote(key))
        self.reply(204)

    def do_GET(self):
        u = urlparse(self.path)
        if u.path == "/__requests":
            return self.reply(200, json.dumps(counts).encode(), "application/json")
        if u.path == "/__reset":  # every deleted key back, counts kept
            deleted.clear()
            return self.reply(200, b"{}", "application/json")
        counts["LIST"] += 1
        q = parse_qs(u.query)
        want = q.get("prefix", [""])[0]
        # Keys are byte-sorted; bisect on the str list works for the ASCII keys generated here.
        lo = bisect.bisect_left(keys, want)
        start = max(int(q.get("continuation-token", [str(lo)])[0]), lo)
        page = []
        i = start
        while i < len(keys) and len(page) < 1000 and keys[i].startswith(want):
            if keys[i] not in deleted:
                page.append(keys[i])
            i += 1
        nxt = i
        truncated = nxt < len(keys) and keys[nxt].startswith(want)
        parts = ['<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
                 f"<Name>bench</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount><MaxKeys>1000</MaxKeys>",
                 f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if truncated:
            parts.append(f"<NextContinuationToken>{nxt}</NextContinuationToken>")
        for k in page:
            parts.append(f"<Contents><Key>{escape(k)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><Size>4096</Size><StorageClass>STANDARD</StorageClass></Contents>")
        parts.append("</ListBucketResult>")
        self.reply(200, "".join(parts).encode())


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
