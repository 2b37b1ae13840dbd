#!/usr/bin/env python3
"""The soak test's Synapse stand-in (see scripts/soak.sh).

write: writes media the way Synapse does (makedirs, open/write/close, then the database row),
reads some back (the local file, or the object in s3s-fs's data dir once the sweep removed it,
as Synapse would through s3_storage_provider), and deletes a few media (files and rows, as
Synapse's media retention does). Everything goes to a JSON-lines manifest.

audit: compares the manifest with the store and the bucket and prints the verdict as JSON.
"""
import argparse
import hashlib
import json
import os
import random
import string
import subprocess
import sys
import time

ALPHABET = string.ascii_letters
ORIGINS = ["matrix.org", "example.com", "remote.example.net:8448"]


def media_id(rng):
    return "".join(rng.choice(ALPHABET) for _ in range(24))


def split(i):
    return f"{i[:2]}/{i[2:4]}/{i[4:]}"


def size_of(rng):
    r = rng.random()
    if r < 0.80:
        return rng.randint(1_000, 200_000)
    if r < 0.98:
        return rng.randint(200_000, 3_000_000)
    return rng.randint(17 << 20, 24 << 20)  # above the 16 MiB multipart threshold


class Db:
    """Batches SQL and runs it with psql once a second; keeps it while PostgreSQL is down."""

    def __init__(self, host, port):
        self.args = ["psql", "-X", "-q", "-h", host, "-p", str(port), "-U", "postgres",
                     "-d", "synapse", "-v", "ON_ERROR_STOP=1"]
        self.pending = []
        self.failures = 0

    def add(self, sql):
        self.pending.append(sql)

    def flush(self):
        if not self.pending:
            return
        script = "BEGIN;\n" + "\n".join(self.pending) + "\nCOMMIT;\n"
        r = subprocess.run(self.args, input=script.encode(), capture_output=True)
        if r.returncode == 0:
            self.pending = []
        else:
            self.failures += 1


def q(s):
    return "'" + s.replace("'", "''") + "'"


def write(args):
    rng = random.Random(args.seed)
    db = Db(args.pg_host, args.pg_port)
    live = []  # (media key for deletion, [relative paths])
    counts = dict(written=0, files=0, bytes=0, reads=0, reads_from_bucket=0, read_errors=0,
                  deleted_media=0, write_backs=0, write_backs_cut=0)
    end = time.monotonic() + args.seconds
    next_flush = time.monotonic() + 1
    period = 1.0 / args.rate
    with open(args.manifest, "a") as manifest:
        def note(obj):
            manifest.write(json.dumps(obj) + "\n")

        while time.monotonic() < end:
            tick = time.monotonic()
            # One new media (and sometimes its thumbnails).
            i = media_id(rng)
            now_ms = int(time.time() * 1000)
            if rng.random() < 0.7:
                original = f"local_content/{split(i)}"
                thumbs = f"local_thumbnails/{split(i)}" if rng.random() < 0.3 else None
                db.add(f"INSERT INTO local_media_repository (media_id, media_type, media_length, "
                       f"created_ts, upload_name, user_id) VALUES ({q(i)}, 'image/png', 1, "
                       f"{now_ms}, 'soak', '@soak:example.com');")
                key = ("local", i)
            else:
                origin = rng.choice(ORIGINS)
                original = f"remote_content/{origin}/{split(i)}"
                thumbs = f"remote_thumbnail/{origin}/{split(i)}" if rng.random() < 0.3 else None
                db.add(f"INSERT INTO remote_media_cache (media_origin, media_id, media_type, "
                       f"created_ts, media_length, filesystem_id) VALUES ({q(origin)}, "
                       f"{q(i[::-1])}, 'image/png', {now_ms}, 1, {q(i)});")
                key = ("remote", origin, i[::-1])
            rels = [original]
            if thumbs:
                rels += [f"{thumbs}/32-32-image-png-crop", f"{thumbs}/640-480-image-jpeg-scale"]
            for rel in rels:
                data = os.urandom(size_of(rng) if rel == original else rng.randint(500, 50_000))
                path = os.path.join(args.root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                note({"rel": rel, "md5": hashlib.md5(data).hexdigest(), "size": len(data)})
                counts["files"] += 1
                counts["bytes"] += len(data)
            counts["written"] += 1
            live.append((key, rels))

            # Read one back, as a client download would.
            if live and rng.random() < 0.5:
                _, rels_r = rng.choice(live)
                rel = rels_r[0]
                counts["reads"] += 1
                try:
                    with open(os.path.join(args.root, rel), "rb") as f:
                        f.read()
                except FileNotFoundError:
                    try:
                        with open(os.path.join(args.bucket_dir, rel), "rb") as f:
                            data = f.read()
                        counts["reads_from_bucket"] += 1
                        # Sometimes Synapse writes it back locally (ensure_media_is_in_local_cache:
                        # open(path, "wb"), no temp file), and sometimes that write is cut short
                        # (a full disk, a restart): a truncated local copy that the daemon must
                        # heal from the bucket, never upload (the audit's local_changed must be 0).
                        if rng.random() < 0.3:
                            cut = rng.random() < 0.3
                            with open(os.path.join(args.root, rel), "wb") as f:
                                f.write(data[: rng.randrange(len(data))] if cut and data else data)
                            counts["write_backs_cut" if cut else "write_backs"] += 1
                    except FileNotFoundError:
                        counts["read_errors"] += 1

            # Now and then Synapse deletes a media: its row and its files.
            if len(live) > 20 and rng.random() < 0.02:
                key, rels_d = live.pop(rng.randrange(len(live)))
                if key[0] == "local":
                    db.add(f"DELETE FROM local_media_repository WHERE media_id = {q(key[1])};")
                else:
                    db.add(f"DELETE FROM remote_media_cache WHERE media_origin = {q(key[1])} "
                           f"AND media_id = {q(key[2])};")
                for rel in rels_d:
                    try:
                        os.remove(os.path.join(args.root, rel))
                    except FileNotFoundError:
                        pass
                    note({"deleted": rel})
                counts["deleted_media"] += 1

            if time.monotonic() >= next_flush:
                db.flush()
                manifest.flush()
                next_flush = time.monotonic() + 1
            time.sleep(max(0.0, period - (time.monotonic() - tick)))
        # The rows of the last second, once PostgreSQL answers.
        for _ in range(120):
            db.flush()
            if not db.pending:
                break
            time.sleep(1)
    counts["db_retries"] = db.failures
    json.dump(counts, sys.stdout)
    print()


def burst(args):
    """Writes COUNT small local media in new directories as fast as it can (an inotify queue
    overflow while the daemon is stopped: the kernel drops events, "directory created" ones too),
    then their rows. Manifest lines as `write` makes them."""
    rng = random.Random(args.seed)
    db = Db(args.pg_host, args.pg_port)
    now_ms = int(time.time() * 1000)
    with open(args.manifest, "a") as manifest:
        for _ in range(args.count):
            i = media_id(rng)
            rel = f"local_content/{split(i)}"
            path = os.path.join(args.root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = os.urandom(rng.randint(500, 2_000))
            with open(path, "wb") as f:
                f.write(data)
            manifest.write(json.dumps({"rel": rel, "md5": hashlib.md5(data).hexdigest(),
                                       "size": len(data)}) + "\n")
            db.add(f"INSERT INTO local_media_repository (media_id, media_type, media_length, "
                   f"created_ts, upload_name, user_id) VALUES ({q(i)}, 'image/png', 1, "
                   f"{now_ms}, 'burst', '@soak:example.com');")
    # New directories are not watched yet, so their files make no events: rewrite one file at the
    # root (not a media path, never uploaded) as many times again, which overflows the queue for
    # sure (opens, writes and closes alternate, so the kernel cannot merge them).
    noise = os.path.join(args.root, "soak-noise")
    for _ in range(args.count):
        with open(noise, "wb") as f:
            f.write(b"x")
    os.remove(noise)
    for _ in range(120):
        db.flush()
        if not db.pending:
            break
        time.sleep(1)
    json.dump(dict(files=args.count), sys.stdout)
    print()


def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def audit(args):
    files = {}
    for manifest in args.manifest:
        with open(manifest) as m:
            for line in m:
                e = json.loads(line)
                if "deleted" in e:
                    files.pop(e["deleted"], None)
                else:
                    files[e["rel"]] = e["md5"]
    # lost: not in the bucket byte-identical after the drain (every file must end up there);
    # wrongly deleted: the local copy is gone too (the sweep removed the only copy).
    out = dict(files=len(files), in_bucket=0, swept=0, lost=0, wrongly_deleted=0,
               local_changed=0, examples=[])
    for rel, md5 in files.items():
        local = os.path.join(args.root, rel)
        obj = os.path.join(args.bucket_dir, rel)
        in_bucket = os.path.isfile(obj) and md5_of(obj) == md5
        here = os.path.isfile(local)
        if here and md5_of(local) != md5:
            out["local_changed"] += 1
        if in_bucket:
            out["in_bucket"] += 1
            out["swept"] += not here
            continue
        out["lost"] += 1
        out["wrongly_deleted"] += not here
        if len(out["examples"]) < 5:
            out["examples"].append(rel + ("" if here else " (deleted locally)"))
    json.dump(out, sys.stdout)
    print()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--root", required=True)
    w.add_argument("--bucket-dir", required=True)
    w.add_argument("--manifest", required=True)
    w.add_argument("--pg-host", default="127.0.0.1")
    w.add_argument("--pg-port", type=int, required=True)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--rate", type=float, default=5)
    w.add_argument("--seed", type=int, default=1)
    b = sub.add_parser("burst")
    b.add_argument("--root", required=True)
    b.add_argument("--manifest", required=True)
    b.add_argument("--pg-host", default="127.0.0.1")
    b.add_argument("--pg-port", type=int, required=True)
    b.add_argument("--count", type=int, default=20_000)
    b.add_argument("--seed", type=int, default=2)
    a = sub.add_parser("audit")
    a.add_argument("--root", required=True)
    a.add_argument("--bucket-dir", required=True)
    a.add_argument("--manifest", required=True, action="append")
    args = p.parse_args()
    {"write": write, "burst": burst, "audit": audit}[args.cmd](args)


if __name__ == "__main__":
    main()
