"""Minimal reproduction, no kdkit, of the DALI crash that kdkit.shards.headers works around (for an
upstream report): DALI 2.4's CPU image decoder segfaults the process on a JPEG whose header does not
parse (FF D8, then zeros, then its last two bytes) placed early in a batch of 32, instead of raising.

    python scripts/repro_dali_bad_jpeg.py [BATCH]    # exit 139 (SIGSEGV) in most runs at BATCH=32

On the project's 2-core box (DALI 2.4.0, CPU backend, device_id=None): 10 of 12 runs at a batch of 32
crashed, with num_threads 1 or 2 and with exec_dynamic=True or exec_async=False/exec_pipelined=False
alike; 15 of 15 runs at a batch of 8 or 16 raised a clean RuntimeError ("[jpeg_parser] Invalid marker").
"""
import io
import sys

import numpy as np
from nvidia.dali import fn, pipeline_def
from PIL import Image

BATCH = int(sys.argv[1]) if len(sys.argv) > 1 else 32
rng = np.random.default_rng(3)
good = []
for _ in range(BATCH):
    b = io.BytesIO()
    size = (int(rng.integers(200, 400)), int(rng.integers(250, 500)), 3)
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(b, "JPEG", quality=88)
    good.append(np.frombuffer(b.getvalue(), np.uint8))
bad = good[3].copy()
bad[2:-2] = 0  # the damage: SOI and the last two bytes kept, every byte between them zero
batch = good[:3] + [bad] + good[4:]


@pipeline_def(batch_size=BATCH, num_threads=2, device_id=None)
def pipe():
    jpegs = fn.external_source(source=lambda: batch, batch=True)
    return fn.resize(fn.decoders.image(jpegs, device="cpu"), size=(32, 32))


for attempt in range(5):
    p = pipe()
    p.build()
    try:
        p.run()
        print(f"run {attempt}: no error")
    except RuntimeError as e:
        print(f"run {attempt}: a clean RuntimeError: {str(e).splitlines()[0][:120]}")
