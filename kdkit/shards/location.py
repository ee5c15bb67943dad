"""Where a shard set lives: a local folder, or a prefix in object storage (`s3://BUCKET/PREFIX`,
`gs://BUCKET/PREFIX`), behind one small path type.

`location(x)` is the one place a location is parsed: a local path stays a `pathlib.Path` (local sets
are read and written exactly as before), a URL becomes a `BucketPath`, which has the part of
pathlib's interface the shard code uses (`/`, name, parent, suffix, exists, stat, open, read_text,
glob, iterdir, unlink) over fsspec. So the reader, the writers, verify and the teacher pass take either
without branching; DALI gets `str(path)`, the same URL, and reads tars and indexes itself.

Why fsspec (with s3fs for s3://, gcsfs for gs://) and not boto3: one interface for both stores DALI
reads, each with its store's standard credentials (s3fs: botocore's chain, i.e. the environment,
~/.aws and instance roles, and AWS_ENDPOINT_URL for S3-compatible stores; gcsfs: Google's
application-default credentials); seekable file objects doing ranged reads (a sample's member read
by offset, tarfile walking a shard); and an upload that is one PUT, or a multipart upload completed
only at its end, so an object appears whole or not at all. boto3 covers S3 alone, and the ranged
file objects would be ours to write. Not universal_pathlib's UPath (the same idea): every store
failure must become one line naming the URL, in one place (`_store_errors`), and that is most of
this class; the rest is a dozen lines of path arithmetic.

Credentials never pass through kdkit: a URL holding user info or a query string is refused (it would
end up in manifests, run folders and logs), and errors name the URL and the endpoint, never a key.

What a bucket location costs on the writing side (kdkit/shards/tario.py, resume.py): a shard is built
in local scratch (`scratch_dir`, under $TMPDIR) and uploaded whole, index first, under its real name,
with its sha256 as object metadata; the job's plan and per-shard records live in the bucket
(PREFIX/.kdkit-state/), so reruns and `--part` machines without a shared filesystem see the same state.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kdkit.errors import KdkitError

# scheme -> (fsspec protocol, the package that implements it, the kdkit extra that installs it)
SCHEMES = {"s3": ("s3", "s3fs", "s3"), "gs": ("gs", "gcsfs", "gcs")}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class BucketError(KdkitError):
    """An object store refused or could not be reached: one line naming the URL and what to do."""


def redact(url: str) -> str:
    """A URL as kdkit may print it: no user info (a key pasted into a URL), no query string, no fragment."""
    m = _URL.match(url)
    if not m:
        return url
    rest = url[m.end():].split("?", 1)[0].split("#", 1)[0]
    host, _, path = rest.partition("/")
    return f"{m.group(1)}://{host.rsplit('@', 1)[-1]}" + (f"/{path}" if path else "")


def location(x) -> Path | BucketPath:
    """A local folder or file as a Path, an object-store URL as a BucketPath; refuses what is neither."""
    if isinstance(x, (Path, BucketPath)):
        return x
    text = os.fspath(x)
    m = _URL.match(text)
    if not m:
        return Path(text)
    scheme = m.group(1).lower()
    if scheme == "file":
        return Path(text[m.end():] or "/")
    shown = redact(text)
    if scheme not in SCHEMES:
        raise BucketError(f"{shown}: kdkit does not read {scheme}:// URLs; give a local folder, s3://BUCKET/PREFIX "
                          "(AWS or an S3-compatible store through AWS_ENDPOINT_URL) or gs://BUCKET/PREFIX")
    host = text[m.end():].split("/", 1)[0]
    if "@" in host or "?" in text or "#" in text:
        raise BucketError(f"{shown}: a URL holding credentials or a query string is refused (it would be stored in "
                          "manifests, run folders and logs); give the plain URL and the credentials the standard way "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, an instance role; for gs:// "
                          "Google's application-default credentials)")
    if not host:
        raise BucketError(f"{shown}: no bucket name (expected {scheme}://BUCKET/PREFIX)")
    return BucketPath(f"{scheme}://" + text[m.end():].strip("/"))


def location_arg(text: str) -> Path | BucketPath:
    """argparse type of a folder-or-URL argument: a refusal becomes argparse's one-line error."""
    import argparse

    try:
        return location(text)
    except KdkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def local_side(loc: Path | BucketPath) -> Path:
    """Where the local files that belong to `loc` go: `loc` itself for a folder, a scratch folder of
    this machine for a bucket prefix (temp tars before upload, decompressed inputs)."""
    return loc.scratch if isinstance(loc, BucketPath) else loc


def open_read(path, encoding: str | None = None):
    """Open a local file or an object for reading: binary, or text in `encoding`."""
    p = location(path)
    if isinstance(p, BucketPath):
        return p.open("r", encoding) if encoding else p.open("rb")
    return open(p, "r", encoding=encoding) if encoding else open(p, "rb")


def replace(src: Path | BucketPath, dst: Path | BucketPath, sha256: str | None = None) -> None:
    """Move src over dst as os.replace does: a rename locally; into a bucket, the upload of a finished
    local file (its sha256, where given, kept as object metadata) or a server-side copy, then src removed.
    Either way dst appears whole or not at all."""
    if not isinstance(dst, BucketPath):
        os.replace(src, dst)
        return
    if isinstance(src, BucketPath):
        dst.copy_from(src)
    else:
        dst.upload(src, sha256)
    src.unlink()


def copy_file(src, dst) -> None:
    """Copy a small file (a skip report) between any two locations."""
    src, dst = location(src), location(dst)
    if isinstance(src, Path) and isinstance(dst, Path):
        import shutil

        shutil.copyfile(src, dst)
    else:
        dst.write_bytes(src.read_bytes())


def matches_checksum(path: Path | BucketPath, sha256: str) -> bool:
    """Whether a shard kdkit recorded as written still is: an object must carry the sha256 it was uploaded
    with (cheap: one request). A local file is not re-hashed here (its recorded size is checked)."""
    return path.sha256() == sha256 if isinstance(path, BucketPath) else True


def abort_uploads(folder: Path | BucketPath, names: list[str]) -> None:
    """A killed run's unfinished uploads of these files, aborted (nothing to do in a local folder)."""
    if isinstance(folder, BucketPath) and names:
        folder.abort_uploads(names)


def version(stat) -> object:
    """What changes whenever a file's bytes may have: the mtime of a local file, an object's ETag."""
    return getattr(stat, "etag", None) or stat.st_mtime_ns


# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectStat:
    st_size: int
    st_mtime_ns: int
    etag: str  # a new one for every upload of the key: what check_checksums' cache keys on


class BucketPath:
    """`scheme://bucket/key`: an object or a prefix ("folder") in a bucket, with pathlib's manners."""

    __slots__ = ("url",)

    def __init__(self, url: str):
        self.url = url

    # -- the path itself ---------------------------------------------------------------------
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"BucketPath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, BucketPath) and other.url == self.url

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name) -> BucketPath:
        name = str(name).strip("/")
        return BucketPath(f"{self.url}/{name}") if name else self

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def _path(self) -> str:  # bucket/key, as fsspec names it
        return self.url.split("://", 1)[1]

    @property
    def _key(self) -> PurePosixPath:
        return PurePosixPath("/" + self._path.partition("/")[2])

    @property
    def name(self) -> str:
        return self._key.name

    @property
    def stem(self) -> str:
        return self._key.stem

    @property
    def suffix(self) -> str:
        return self._key.suffix

    @property
    def parent(self) -> BucketPath:
        return BucketPath(self.url.rsplit("/", 1)[0]) if "/" in self._path else self

    @property
    def parents(self) -> list[BucketPath]:
        out, p = [], self
        while p.parent != p:
            p = p.parent
            out.append(p)
        return out

    def with_name(self, name: str) -> BucketPath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> BucketPath:
        return self.parent / self._key.with_suffix(suffix).name

    def resolve(self) -> BucketPath:
        return self

    absolute = resolve

    @property
    def scratch(self) -> Path:
        """This machine's scratch folder for the prefix (made on first use): temp shards are built here,
        then uploaded."""
        folder = scratch_dir() / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- the store ---------------------------------------------------------------------------
    @property
    def fs(self):
        protocol, package, extra = SCHEMES[self.scheme]
        try:
            import fsspec

            # listings are not cached: writers check for objects they (or other machines) just wrote
            return fsspec.filesystem(protocol, use_listings_cache=False)
        except ImportError:
            raise BucketError(f"{self}: {self.scheme}:// needs the {package} package: pip install 'kdkit[{extra}]' "
                              f"(or pip install {package})") from None

    def _errors(self, doing: str):
        return _store_errors(self, doing)

    def exists(self) -> bool:
        """Whether the object or prefix exists; a missing bucket is an error (nothing can be read or
        written there), said in one line instead of "does not exist" further on."""
        with self._errors("read"):
            if self.fs.exists(self._path):
                return True
            bucket = self._path.split("/", 1)[0]
            if bucket != self._path and not self.fs.exists(bucket):
                raise FileNotFoundError(errno.ENOENT, "The specified bucket does not exist", bucket)
        return False

    def is_dir(self) -> bool:
        with self._errors("read"):
            return self.fs.isdir(self._path)

    def is_file(self) -> bool:
        with self._errors("read"):
            return self.fs.isfile(self._path)

    def stat(self) -> ObjectStat:
        with self._errors("read"):
            info = self.fs.info(self._path)
        when = info.get("LastModified") or info.get("updated") or info.get("mtime")
        stamp = int(when.timestamp() * 1e9) if hasattr(when, "timestamp") else 0
        return ObjectStat(int(info.get("size") or 0), stamp,
                          str(info.get("ETag") or info.get("etag") or info.get("generation") or stamp))

    def open(self, mode: str = "rb", encoding: str = "utf-8"):
        if mode not in ("r", "rb"):
            raise ValueError(f"{self}: objects are written whole (write_bytes, upload), not opened for {mode!r}")
        with self._errors("read"):
            f = _Guarded(self.fs.open(self._path, "rb"), self)
        return io.TextIOWrapper(io.BufferedReader(f), encoding=encoding) if mode == "r" else f

    def read_bytes(self) -> bytes:
        with self._errors("read"):
            return self.fs.cat_file(self._path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def iterdir(self):
        with self._errors("list"):
            names = self.fs.ls(self._path, detail=False)
        return iter(sorted(BucketPath(f"{self.scheme}://{n.rstrip('/')}") for n in names))

    def glob(self, pattern: str):
        with self._errors("list"):
            found = self.fs.glob(f"{self._path}/{pattern}")
        return iter(sorted(BucketPath(f"{self.scheme}://{n}") for n in found))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make: a prefix exists once an object is under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        with self._errors("delete from"):
            try:
                self.fs.rm_file(self._path)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    # writes: each is one PUT (or a multipart upload completed at its end), so readers see the whole
    # object or none; there is no half-written object to clean up after a kill
    def write_bytes(self, data: bytes) -> None:
        with self._errors("write to"):
            self.fs.pipe_file(self._path, bytes(data))

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def upload(self, local: Path, sha256: str | None = None) -> None:
        """Upload a finished local file under this key, its sha256 kept as object metadata (what a rerun
        compares with its record before keeping an uploaded shard)."""
        meta = {} if sha256 is None else ({"Metadata": {"sha256": sha256}} if self.scheme == "s3"
                                          else {"metadata": {"sha256": sha256}})
        with self._errors("write to"):
            self.fs.put_file(str(local), self._path, **meta)

    def sha256(self) -> str | None:
        """The sha256 recorded with the object when kdkit uploaded it (None: uploaded otherwise)."""
        with self._errors("read"):
            meta = self.fs.metadata(self._path) if hasattr(self.fs, "metadata") else \
                (self.fs.info(self._path).get("metadata") or {})
        return (meta or {}).get("sha256")

    def abort_uploads(self, names: list[str]) -> None:
        """Abort the unfinished multipart uploads of these objects under this prefix: a killed upload's
        parts are invisible but billed until aborted (gs:// has none to abort)."""
        if self.scheme != "s3":
            return
        bucket, _, prefix = self._path.partition("/")
        keys = {f"{prefix}/{n}" if prefix else n for n in names}
        with self._errors("write to"):
            listed = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
            for up in listed.get("Uploads", []):
                if up["Key"] in keys:
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])

    def copy_from(self, src: BucketPath) -> None:
        """Server-side copy (metadata included): the object appears whole."""
        with self._errors("write to"):
            self.fs.copy(src._path, self._path)


def scratch_dir() -> Path:
    """This machine's scratch for bucket outputs: $KDKIT_SCRATCH, else $TMPDIR/kdkit-scratch."""
    return Path(os.environ.get("KDKIT_SCRATCH") or Path(tempfile.gettempdir()) / "kdkit-scratch")


def endpoint(scheme: str) -> str:
    """The store kdkit talks to for `scheme`, as the user configured it (redacted)."""
    if scheme == "s3":
        url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return redact(url) if url else "AWS S3"
    return "Google Cloud Storage"


_CONNECTION = {"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
               "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "TimeoutError",
               "ConnectionError", "ConnectionRefusedError", "ConnectionResetError"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "RefreshError"}


class _store_errors:
    """Turn a store's exceptions into one line naming the URL: no credentials, access denied, no such
    bucket, the store unreachable. A missing object stays a FileNotFoundError (naming the URL), so code
    that asks "is it there?" reads the same for a folder and a bucket."""

    def __init__(self, where: BucketPath, doing: str):
        self.where, self.doing = where, doing

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, (KdkitError, KeyboardInterrupt)) or not isinstance(err, Exception):
            return False
        raise translate(err, self.where, self.doing) from None


def translate(err: Exception, where: BucketPath, doing: str = "read") -> Exception:
    names = {c.__name__ for c in type(err).__mro__}
    store = endpoint(where.scheme)
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if names & _NO_CREDENTIALS:
        return BucketError(f"{where}: no credentials for {where.scheme}:// ({text}); set them the standard way: "
                           + ("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE with ~/.aws, or an instance role"
                              if where.scheme == "s3" else "`gcloud auth application-default login` or "
                              "GOOGLE_APPLICATION_CREDENTIALS"))
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return BucketError(f"{where}: {store} refused access ({text}); check the credentials (a wrong or expired "
                           f"key?) and that they may {doing} this bucket")
    if isinstance(err, FileNotFoundError):
        cause = f"{err} {err.__cause__ or ''} {err.__context__ or ''}"
        if "NoSuchBucket" in cause or "bucket does not exist" in cause:
            return BucketError(f"{where.scheme}://{where._path.split('/', 1)[0]}: no such bucket at {store}; "
                               "check the URL"
                               + (" and AWS_ENDPOINT_URL" if where.scheme == "s3" else ""))
        return FileNotFoundError(errno.ENOENT, "no such object", str(where))
    if names & _CONNECTION or isinstance(err, OSError) and err.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
        return BucketError(f"{where}: cannot reach {store} ({text}); check the network"
                           + (" and AWS_ENDPOINT_URL" if where.scheme == "s3" else "")
                           + ", then run the same command again: nothing written is lost")
    return BucketError(f"{where}: {store} failed to {doing} it ({type(err).__name__}: {text})")


class _Guarded(io.RawIOBase):
    """A store's file object whose read/seek failures are translated like every other store call."""

    def __init__(self, f, where: BucketPath):
        self.f, self.where, self.name = f, where, str(where)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        with _store_errors(self.where, "read"):
            return self.f.read(n)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        with _store_errors(self.where, "read"):
            return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        if not self.closed:
            self.f.close()
        super().close()


# + " URL": how stock webdataset and timm read a bucket
PIPE = f"pipe:{shlex.quote(sys.executable)} -m kdkit.shards.location"


def webdataset_url(path) -> str:
    """The URL stock webdataset opens `path` by: the path itself, or for an object a `pipe:` running this
    module (webdataset has no s3:// opener; timm joins its --data-dir and the shard names the same way)."""
    return f"{PIPE} {path}" if isinstance(path, BucketPath) else str(path)


def main(argv: list[str]) -> int:
    """`python -m kdkit.shards.location URL`: the object (or file) on stdout, with kdkit's credentials,
    endpoint and one-line errors: `pipe:python -m kdkit.shards.location s3://BUCKET/PREFIX/...` in
    webdataset or timm. Light on purpose: it starts once per shard."""
    if len(argv) != 1:
        print("usage: python -m kdkit.shards.location URL  (writes the object to stdout)", file=sys.stderr)
        return 2
    try:
        with open_read(location(argv[0])) as f:
            while block := f.read(1 << 22):
                sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
    except (KdkitError, OSError) as e:
        print(f"kdkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
