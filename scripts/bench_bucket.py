"""The loader read from a bucket against the same shard set on local disk, in one run (docs/scale.md).

    .venv/bin/python scripts/bench_bucket.py [--out bench-out/bucket] [--url s3://BUCKET/PREFIX]

1. writes 1000 synthetic photo-like JPEGs (kdkit.bench.synthetic, seed 0) and shards them with
   `kdkit shard folder --max-size 256 --samples-per-shard 100` twice: into OUT/shards on local disk
   and into the bucket (the same bytes: tests/test_bucket.py checks that);
2. runs `kdkit bench-loader` on each (DALI's CPU backend, 224 px random-resized-crop + flip, batch 64,
   --threads, a 256-sample shuffle buffer, no baseline), alternating local and bucket --repeats times,
   and prints images/s of each and the ratio bucket / local (medians).

Without --url the bucket is on a local S3-compatible server (moto's, from the test extra) on
127.0.0.1, started here: then the ratio shows what the object-store path costs on one machine (one
ranged GET per member and sample, through the server's HTTP stack) without any network latency. With
--url, a real bucket: the credentials and AWS_ENDPOINT_URL as kdkit reads them.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KDKIT = [sys.executable, "-m", "kdkit"]


def start_local_store() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    return proc, "s3://bench/loader"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "bucket")
    p.add_argument("--url", default=None, help="a real bucket prefix (default: a local S3-compatible server)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    server, url = (None, a.url) if a.url else start_local_store()
    try:
        raw, local = a.out / "raw", a.out / "shards"
        if not raw.exists():
            subprocess.run([sys.executable, "-m", "kdkit.bench.synthetic", str(raw), "--images", str(a.images),
                            "--classes", "10", "--seed", "0"], check=True)
        shard = ["shard", "folder", str(raw), "--name", "train", "--samples-per-shard", "100", "--max-size", "256",
                 "--quiet"]
        for where in (str(local), url):
            subprocess.run([*KDKIT, *shard[:3], where, *shard[3:]], check=True)
        # a shuffle buffer smaller than the set: a larger one is filled by reading the set round and round,
        # which from a bucket is one request per member and sample (docs/scale.md)
        bench = ["--batch-size", "64", "--threads", str(a.threads), "--size", "224", "--aug", "rrc-flip",
                 "--shuffle-buffer", "256", "--batches", str(a.batches), "--warmup", "5", "--device", "cpu",
                 "--no-baseline"]
        rates: dict[str, list[float]] = {"local": [], "bucket": []}
        for r in range(a.repeats):
            for name, where in (("local", str(local)), ("bucket", url)):
                out = a.out / f"{name}-{r}.json"
                subprocess.run([*KDKIT, "bench-loader", where, *bench, "--json", str(out)], check=True,
                               stdout=subprocess.DEVNULL)
                report = json.loads(out.read_text())
                rates[name].append(report["results"][0]["images_per_s"])
        med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
        print(f"local disk: {med['local']:.0f} img/s   bucket ({url}, endpoint "
              f"{os.environ.get('AWS_ENDPOINT_URL', 'AWS')}): {med['bucket']:.0f} img/s   "
              f"ratio bucket/local: {med['bucket'] / med['local']:.2f}   (runs: {json.dumps(rates)})")
    finally:
        if server is not None:
            server.terminate()


if __name__ == "__main__":
    main()
