"""A cheap look at each image's header before DALI decodes it, for the shards no checksum vouched for.

Why: DALI 2.4's CPU image decoder crashes the whole process (a segfault in one of its threads, where
no error handler runs) when an image whose header does not parse - a damaged JPEG marker, bytes of
no image format at all - comes early in a batch of 32 or more: the parse error is raised while its
other parsing threads still work on the batch (reproduced with a plain DALI pipeline, no kdkit; the
executor settings do not avoid it). Damage after the header only makes libjpeg warn. A shard whose
manifest checksum was verified holds the images kdkit's writer decoded when it wrote them, so only
the others are walked here: shards without a manifest, or all with KDKIT_CHECKSUMS=0.

Cost: for a JPEG, the 4-byte head of each header segment (a dozen reads of a few bytes, through
one buffered file per tar); for other formats, the first bytes. A few tens of microseconds per image.
"""
from __future__ import annotations

from pathlib import Path

from kdkit.shards import contract

# what DALI's decoders read, by their first bytes (the format is decided by the content, not the name)
SIGNATURES = ((b"\xff\xd8", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"), (b"II*\x00", "tiff"),
              (b"MM\x00*", "tiff"), (b"\x00\x00\x00\x0cjP  ", "jpeg2000"), (b"\xff\x4f\xff\x51", "jpeg2000"),
              (b"GIF87a", "gif"), (b"GIF89a", "gif"), (b"P1", "pnm"), (b"P2", "pnm"), (b"P3", "pnm"), (b"P4", "pnm"),
              (b"P5", "pnm"), (b"P6", "pnm"))
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # frame headers


def problem(f, offset: int, size: int) -> str | None:
    """Why the image at [offset, offset + size) of the open file `f` would not parse, or None."""
    f.seek(offset)
    head = f.read(min(size, 16))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    kind = next((k for sig, k in SIGNATURES if head.startswith(sig)), None)
    if kind is None:
        return f"its first bytes ({head[:8].hex(' ')}) are no image format's"
    return _jpeg_problem(f, offset, size) if kind == "jpeg" else None


def _jpeg_problem(f, offset: int, size: int) -> str | None:
    """Walk the JPEG's marker segments from SOI to the start of the image data (SOS)."""
    pos, end, frame = offset + 2, offset + size, False
    while pos + 4 <= end:
        f.seek(pos)
        b = f.read(4)
        if b[0] != 0xFF:
            return f"no JPEG marker at byte {pos - offset} (0x{b[0]:02x})"
        if b[1] == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        marker = b[1]
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a segment
            pos += 2
            continue
        if marker in (0x00, 0xD8, 0xD9):
            return f"invalid JPEG marker 0x{marker:02x} at byte {pos - offset}" if marker != 0xD9 else \
                "the JPEG ends before its image data"
        length = int.from_bytes(b[2:4], "big")
        if length < 2 or pos + 2 + length > end:
            return f"JPEG segment 0x{marker:02x} at byte {pos - offset} runs past the image"
        if marker in _SOF:
            sof = f.read(6)
            if len(sof) < 6 or int.from_bytes(sof[1:3], "big") == 0 or int.from_bytes(sof[3:5], "big") == 0 \
                    or sof[5] == 0:
                return "the JPEG frame header gives no size or no colour component"
            frame = True
        if marker == 0xDA:
            return None if frame else "JPEG image data before its frame header"
        pos += 2 + length
    return "the JPEG header ends before its image data"


def check_headers(tars: list[Path], image_ext: str = contract.IMAGE_EXT, progress: bool = False) -> None:
    """Raise ShardError naming the shard and sample of the first image in `tars` whose header would not
    parse (module doc). The tars' DALI indexes say where each image is."""
    from kdkit.shards import location
    from kdkit.shards.reader import ShardError, _parse_index

    from tqdm import tqdm

    with tqdm(total=len(tars), unit="shard", desc="checking image headers (shards without a verified checksum)",
              disable=not progress or len(tars) < 50) as bar:
        for tar in tars:
            with location.open_read(tar) as f:  # a bucket object too (KDKIT_CHECKSUMS=0 on a bucket set)
                for key, comps in _parse_index(tar.with_suffix(".idx")):
                    if image_ext in comps:
                        why = problem(f, *comps[image_ext])
                        if why:
                            raise ShardError(f"{tar}: sample {key}: image does not decode ({why}). DALI cannot skip "
                                             "bad images inside a pipeline (and crashes on this kind); rewrite the "
                                             "shard without it, and check the whole set with `kdkit verify --decode`")
            bar.update(1)
