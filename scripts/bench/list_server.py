#!/usr/bin/env python3
"""A read-only ListObjectsV2 endpoint for the audit benchmark (not a test double: tests use s3s-fs).

s3s-fs walks its whole data directory for every listing page, so listing 5,000,000 objects from it
would take hours; this server answers listing pages of a generated, sorted key set instead, so the
benchmark measures the audit, not the server. Keys: for media i in 1..N, id = md5(i)[:24];
`PREFIX/local_content/AB/CD/REST` and 4 thumbnails under `PREFIX/local_thumbnails/AB/CD/REST/`,
minus every 100th media (lost), plus M orphans. Same generator as scripts/bench-audit.sh's SQL.

usage: list_server.py PORT N ORPHANS PREFIX
"""
import hashlib
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        start = int(q.get("continuation-token", ["0"])[0])
        page = keys[start:start + 1000]
        nxt = start + len(page)
        truncated = nxt < len(keys)
        parts = ['<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
                 f"<Name>bench</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount><MaxKeys>1000</MaxKeys>",
                 f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if truncated:
            parts.append(f"<NextContinuationToken>{nxt}</NextContinuationToken>")
        for k in page:
            parts.append(f"<Contents><Key>{escape(k)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><Size>4096</Size><StorageClass>STANDARD</StorageClass></Contents>")
        parts.append("</ListBucketResult>")
        body = "".join(parts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
