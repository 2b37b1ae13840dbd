#!/usr/bin/env python3
"""Fills a PostgreSQL database that has Synapse's media tables with rows matching a media store.

s3_media_upload finds what to upload through Synapse's database, so the peer benchmark gives it
one that describes the generated store. Rows are derived from the paths alone:
  local_content/AB/CD/REST                  -> local_media_repository (media_id ABCDREST)
  local_thumbnails/AB/CD/REST/W-H-T-S-M     -> local_media_repository_thumbnails
  remote_content/ORIGIN/AB/CD/REST          -> remote_media_cache (ORIGIN, filesystem_id ABCDREST)
  remote_thumbnail/ORIGIN/AB/CD/REST/W-H-T-S-M -> remote_media_cache_thumbnails
Thumbnail names follow Synapse: width-height-top-sub-method (type top/sub).
Every media is given created_ts = AGE_DAYS days ago and no last_access_ts, so that
`s3_media_upload update <store> 1d` selects all of it.

usage: synapse_db.py STORE DBNAME [--age-days N] [--host H] [--port P] [--user U]
Needs psql on the PATH (loads the rows with \\copy, no Python driver needed).
"""
import argparse
import csv
import os
import subprocess
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("db")
    ap.add_argument("--age-days", type=int, default=400)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", default="5432")
    ap.add_argument("--user", default="postgres")
    a = ap.parse_args()
    ts = int(time.time() * 1000) - a.age_days * 86_400_000
    tables = {
        "local_media_repository": ["media_id", "media_type", "media_length", "created_ts",
                                   "upload_name", "user_id"],
        "local_media_repository_thumbnails": ["media_id", "thumbnail_width", "thumbnail_height",
                                              "thumbnail_type", "thumbnail_method",
                                              "thumbnail_length"],
        "remote_media_cache": ["media_origin", "media_id", "media_type", "created_ts",
                               "upload_name", "media_length", "filesystem_id"],
        "remote_media_cache_thumbnails": ["media_origin", "media_id", "thumbnail_width",
                                          "thumbnail_height", "thumbnail_method",
                                          "thumbnail_type", "thumbnail_length", "filesystem_id"],
    }
    rows = {t: [] for t in tables}
    for dirpath, _dirs, files in os.walk(a.store):
        rel = os.path.relpath(dirpath, a.store).split(os.sep)
        for name in files:
            size = os.path.getsize(os.path.join(dirpath, name))
            parts = rel + [name]
            top = parts[0]
            if top == "local_content" and len(parts) == 4:
                rows["local_media_repository"].append(
                    ["".join(parts[1:]), "application/octet-stream", size, ts, name, "@bench:example.com"])
            elif top == "remote_content" and len(parts) == 5:
                fid = "".join(parts[2:])
                rows["remote_media_cache"].append(
                    [parts[1], fid, "application/octet-stream", ts, name, size, fid])
            elif top in ("local_thumbnails", "remote_thumbnail"):
                w, h, ttop, tsub, method = name.split("-", 4)
                if top == "local_thumbnails" and len(parts) == 5:
                    rows["local_media_repository_thumbnails"].append(
                        ["".join(parts[1:4]), w, h, f"{ttop}/{tsub}", method, size])
                elif top == "remote_thumbnail" and len(parts) == 6:
                    fid = "".join(parts[2:5])
                    rows["remote_media_cache_thumbnails"].append(
                        [parts[1], fid, w, h, method, f"{ttop}/{tsub}", size, fid])
    with tempfile.TemporaryDirectory() as tmp:
        script = []
        for table, cols in tables.items():
            path = os.path.join(tmp, table + ".csv")
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(rows[table])
            script.append(f"\\copy {table} ({', '.join(cols)}) FROM '{path}' WITH (FORMAT csv)")
        script.append("ANALYZE;")
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", a.host, "-p", a.port,
                        "-U", a.user, "-d", a.db], input="\n".join(script) + "\n", text=True,
                       check=True)
    print(", ".join(f"{len(r)} {t}" for t, r in rows.items()))


if __name__ == "__main__":
    main()
