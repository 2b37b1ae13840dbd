#!/usr/bin/env python3
"""Generates a repeatable Synapse-like media store (seeded).

Originals 50 KB-2 MB mostly, a few 5-30 MB videos, 1-3 thumbnails (2-40 KB) per local original,
remote media under remote_content/<origin>/ with thumbnails. Content is pseudo-random bytes
(incompressible), drawn from the seed too: the same arguments give the same store, byte for byte.

usage: gen_store.py DIR [--files N] [--seed S] [--scale F]
  --files N   approximate total number of files (default 20000)
  --scale F   multiplies sizes (e.g. 0.1 for a quick run)
"""
import argparse
import os
import random
import string

def media_id(rng):
    return "".join(rng.choice(string.ascii_letters) for _ in range(24))

def write(path, size, rng, pool):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    off = rng.randrange(0, len(pool) - 1)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            # Slices of a random pool, rotated per file: cheap to produce, incompressible.
            chunk = pool[off:off + left] or pool[:left]
            f.write(chunk)
            left -= len(chunk)
            off = 0

def original_size(rng, scale):
    r = rng.random()
    if r < 0.01:
        size = rng.randint(5_000_000, 30_000_000)  # videos
    elif r < 0.85:
        size = rng.randint(50_000, 2_000_000)
    else:
        size = rng.randint(5_000, 50_000)
    return max(1, int(size * scale))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    # From the seed, not os.urandom: names, sizes and contents all repeat across runs.
    pool = random.Random(a.seed).randbytes(64 << 20)
    origins = ["matrix.org", "example.com", "chat.mozilla.org", "kde.org:8448"]
    n = total = 0
    while n < a.files:
        mid = media_id(rng)
        remote = rng.random() < 0.3
        if remote:
            origin = rng.choice(origins)
            base = f"remote_content/{origin}/{mid[:2]}/{mid[2:4]}/{mid[4:]}"
            thumbs = f"remote_thumbnail/{origin}/{mid[:2]}/{mid[2:4]}/{mid[4:]}"
        else:
            base = f"local_content/{mid[:2]}/{mid[2:4]}/{mid[4:]}"
            thumbs = f"local_thumbnails/{mid[:2]}/{mid[2:4]}/{mid[4:]}"
        size = original_size(rng, a.scale)
        write(os.path.join(a.dir, base), size, rng, pool)
        n += 1; total += size
        for (w, h, t, m) in rng.sample([(32, 32, "image/png", "crop"), (96, 96, "image/jpeg", "crop"),
                                         (320, 240, "image/jpeg", "scale"), (640, 480, "image/jpeg", "scale")],
                                        rng.randint(1, 3)):
            tsize = max(1, int(rng.randint(2_000, 40_000) * a.scale))
            top, sub = t.split("/")
            write(os.path.join(a.dir, thumbs, f"{w}-{h}-{top}-{sub}-{m}"), tsize, rng, pool)
            n += 1; total += tsize
    print(f"{n} files, {total / 1e6:.1f} MB in {a.dir}")

if __name__ == "__main__":
    main()
