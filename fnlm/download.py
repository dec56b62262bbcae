"""Fetch the handout's datasets: `fnlm data download {tinystories,owt} --dest DIR`.

A file is fetched into DIR/NAME.part and only renamed once complete and checked, so nothing
under a final name is ever half-written. What is checked:
  - resuming: a cut-off NAME.part is continued (HTTP Range) only with If-Range carrying the
    validator (strong ETag, else Last-Modified) that NAME.part.json recorded when the part was
    started, so a server whose file changed sends the whole new file instead; a part without a
    recorded validator, or a 206 naming another version or total size, starts over;
  - size: the bytes received must equal the size the server announced (Content-Length, or the
    total of Content-Range);
  - content: the manifest's size and sha256 where it pins them (today it pins none, so the
    first download is trusted: its sha256 is recorded and every later run checks against it).
OpenWebText's .gz files are then gunzipped as a stream (constant memory) and removed, as
`gunzip` does.

Next to each final file, NAME.sha256.json records the size and sha256 computed here and whether
they matched a published value; later runs re-verify the file against that record. The manifest
below leaves size and sha256 as None where no published value was at hand: a checksum is only
ever one that this code computed or one copied from the dataset's page.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from email.message import Message
from pathlib import Path

from .files import naming_write_errors, read_json, write_json
from .progress import Progress

BASE_URL_ENV = "FNLM_DATA_BASE_URL"
CHUNK = 1 << 20
TIMEOUT_S = 60  # per socket operation: a stalled connection becomes a retryable interruption


@dataclass(frozen=True)
class RemoteFile:
    """A file as the server serves it; size and sha256 are of the served bytes (for OWT, the .gz).

    None means unknown here. To pin a file, copy its size and sha256 from the dataset's
    Hugging Face page ("Files and versions" lists both for every LFS file).
    """

    name: str
    size: int | None = None
    sha256: str | None = None

    @property
    def gzipped(self) -> bool:
        return self.name.endswith(".gz")

    @property
    def local_name(self) -> str:
        return self.name.removesuffix(".gz")


@dataclass(frozen=True)
class Dataset:
    base_url: str
    splits: dict[str, RemoteFile]


# The URLs of the assignment repository's README (the handout defers to it for downloads).
DATASETS = {
    "tinystories": Dataset(
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main",
        {
            "train": RemoteFile("TinyStoriesV2-GPT4-train.txt"),
            "valid": RemoteFile("TinyStoriesV2-GPT4-valid.txt"),
        },
    ),
    "owt": Dataset(
        "https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main",
        {"train": RemoteFile("owt_train.txt.gz"), "valid": RemoteFile("owt_valid.txt.gz")},
    ),
}


class DownloadError(OSError):
    """A file could not be fetched; the message names the URL or path and the cause."""


class Interrupted(DownloadError):
    """The transfer stopped early; NAME.part keeps what arrived and a retry resumes from there."""


class ChecksumError(DownloadError):
    """The bytes are not the expected file."""


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str


@dataclass(frozen=True)
class Record:
    """The contents of NAME.sha256.json."""

    name: str
    size: int
    sha256: str
    source: str  # the served file's name (the .gz for OWT)
    source_size: int | None  # None: a gunzipped file copied in by hand, its .gz unseen
    source_sha256: str | None
    source_checked_against_manifest: bool
    url: str  # where the source comes from (it may have been copied into DIR by hand)


def fetch_dataset(
    name: str,
    dest: Path,
    *,
    splits: Sequence[str] = ("train", "valid"),
    base_url: str | None = None,
    retries: int = 3,
    retry_delay: float = 2.0,
    verbose: bool = True,
) -> list[Path]:
    """Fetch the dataset's splits into dest; base_url (else $FNLM_DATA_BASE_URL) replaces its host."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    dataset = DATASETS[name]
    unknown = sorted(set(splits) - dataset.splits.keys())
    if unknown:
        raise ValueError(f"unknown split(s) {unknown} of {name}; known: {sorted(dataset.splits)}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    base = base_url or os.environ.get(BASE_URL_ENV) or dataset.base_url
    options = dict(retries=retries, retry_delay=retry_delay, verbose=verbose)
    return [fetch_file(dataset.splits[split], dest, base_url=base, **options) for split in splits]


def fetch_file(
    remote: RemoteFile,
    dest: Path,
    *,
    base_url: str,
    retries: int = 3,
    retry_delay: float = 2.0,
    verbose: bool = True,
) -> Path:
    """Make dest/remote.local_name the verified (and gunzipped) file; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / remote.local_name
    url = f"{base_url.rstrip('/')}/{remote.name}"
    if final.exists():
        verify_existing(final, remote, url, verbose=verbose)
        return final
    fetch = dict(retries=retries, retry_delay=retry_delay, verbose=verbose)
    if remote.gzipped:
        served = dest / remote.name
        if served.exists():  # copied in by hand, or verified by a run that stopped before gunzip
            source = check_source(served, remote, verbose=verbose)
        else:
            source = download(url, served, remote, **fetch)
            finish(partial(served), served)
        digest = gunzip(served, partial(final), verbose=verbose)
    else:
        source = digest = download(url, final, remote, **fetch)  # the bytes wait in final's .part
    record = Record(
        final.name, digest.size, digest.sha256, remote.name, source.size, source.sha256, known(remote), url
    )
    write_record(final, record)  # before the rename: a final file without a record is a manual copy
    finish(partial(final), final)
    if remote.gzipped:
        served.unlink()
    say(f"{final}: {digest.size} bytes, sha256 {digest.sha256}", verbose)
    return final


def download(
    url: str, target: Path, remote: RemoteFile, *, retries: int, retry_delay: float, verbose: bool
) -> Digest:
    """Fetch url into target's .part, retrying interruptions; return the checked digest.

    The verified bytes stay in the .part file; the caller renames it once its record is written.
    """
    part = partial(target)
    for attempt in range(retries + 1):
        try:
            digest = download_once(url, part, remote, verbose=verbose)
            break
        except Interrupted as error:
            if attempt == retries:
                raise
            delay = retry_delay * 2**attempt
            say(f"{error}; retrying in {delay:g} s", verbose)
            time.sleep(delay)
    try:
        check_digest(digest, remote, what=url)
    except ChecksumError as error:
        discard(part)  # resuming bad bytes cannot help
        raise ChecksumError(f"{error}; deleted {part}, run again to download it afresh") from None
    return digest


def download_once(url: str, part: Path, remote: RemoteFile, *, verbose: bool) -> Digest:
    """One request: continue part where it stopped if the server confirms that it still serves
    the file part was started from, else start over.

    The confirmation is HTTP's If-Range: the request carries the validator (a strong ETag, else
    Last-Modified) recorded in NAME.part.json when part was started, and a server whose file
    changed answers 200 with the whole new file instead of 206 with the rest. A part without a
    recorded validator is never resumed.
    """
    state = read_part_state(part)
    offset = part.stat().st_size if part.exists() else 0
    if offset and (state is None or state.get("url") != url or not state.get("validator")):
        say(f"{part}: no record of which version of {url} it holds; starting over", verbose)
        discard(part)
        offset = 0
    headers = {"Range": f"bytes={offset}-", "If-Range": state["validator"]} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if (error.code == 416 and offset and range_total(error.headers.get("Content-Range")) == offset == state["size"]
                and same_version(error.headers, state)):
            return hash_file(part, verbose=verbose)  # the previous run got every byte
        if error.code == 416:
            discard(part)
            raise Interrupted(f"{url}: server refused to resume at byte {offset}; starting over") from None
        raise DownloadError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(offline_message(url, error, part, remote)) from None
    with response:
        start, total = resume_point(response, offset)
        if start is None:
            discard(part)
            content_range = response.headers.get("Content-Range")
            raise Interrupted(f"{url}: unusable Content-Range {content_range!r}; starting over")
        if start and not (same_version(response.headers, state) and total in (None, state["size"])):
            discard(part)  # a 206 from a server that ignored If-Range, for a file that changed
            raise Interrupted(f"{url}: the file changed on the server since {part} was started; starting over")
        if start != offset:
            say(f"{url}: the server sent the whole file (it changed, or the server ignores Range); "
                "restarting from byte 0", verbose)
        if start == 0:
            write_part_state(part, {"url": url, "validator": validator(response.headers), "size": total})
        return receive(response, part, start, total, url=url, verbose=verbose)


def receive(
    response: http.client.HTTPResponse, part: Path, start: int, total: int | None, *, url: str, verbose: bool
) -> Digest:
    """Append the response body to part's first `start` bytes, hashing the whole file as it grows."""
    hasher = hash_prefix(part, start)
    size = start
    label = f"download {part.name.removesuffix('.part')}" + (f" (resumed at {start} B)" if start else "")
    with naming_write_errors(part), open(part, "r+b" if start else "wb") as out, Progress(
        label, total=None if total is None else total - start, unit="B", enabled=verbose
    ) as bar:
        out.truncate(start)
        out.seek(start)
        try:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as error:
            raise Interrupted(f"{url}: transfer interrupted after {size} bytes ({error})") from None
        finally:
            out.flush()
            os.fsync(out.fileno())
    if total is not None and size < total:
        raise Interrupted(f"{url}: connection closed after {size} of {total} bytes; {part} keeps them")
    if total is not None and size > total:
        discard(part)
        raise ChecksumError(f"{url}: received {size} bytes, but the server announced {total}; deleted {part}")
    return Digest(size, hasher.hexdigest())


def resume_point(response: http.client.HTTPResponse, offset: int) -> tuple[int | None, int | None]:
    """(byte the body starts at, total file size if known) from a 200 or 206 response.

    The start is None when a 206 does not continue at offset: those bytes cannot be appended.
    """
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if not match or int(match[1]) != offset:
            return None, None
        return offset, None if match[2] == "*" else int(match[2])
    length = response.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def validator(headers: Message) -> str | None:
    """What If-Range can send back: a strong ETag, else Last-Modified (None if neither)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # If-Range takes only strong ETags
        return etag
    return headers.get("Last-Modified")


def same_version(headers: Message, state: dict) -> bool:
    """False if a response names a version (validator) other than the one recorded; a response
    that names none is taken at its word (it honoured If-Range)."""
    found = validator(headers)
    return found is None or found == state["validator"]


def range_total(content_range: str | None) -> int | None:
    """The N of a 416 answer's 'bytes */N'."""
    match = re.fullmatch(r"bytes \*/(\d+)", content_range or "")
    return int(match[1]) if match else None


def offline_message(url: str, error: Exception, part: Path, remote: RemoteFile) -> str:
    cause = getattr(error, "reason", error)
    then = "verify and gunzip it" if remote.gzipped else "verify it and record its checksum"
    return (
        f"cannot download {url}: {cause}. If this machine has no internet access, download that URL "
        f"elsewhere and copy the file to {part.with_name(remote.name)}, then run this command again to {then}."
    )


def gunzip(source: Path, target: Path, *, verbose: bool) -> Digest:
    """Stream-decompress source into target; return the digest of the decompressed bytes."""
    hasher, size = hashlib.sha256(), 0
    bar = Progress(f"gunzip {source.name}", total=source.stat().st_size, unit="B", enabled=verbose)
    try:
        with (open(source, "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped,
              naming_write_errors(target), open(target, "wb") as out, bar):
            while chunk := unzipped.read(CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
                bar.update(raw.tell() - bar.done)  # progress in compressed bytes: their total is known
            out.flush()
            os.fsync(out.fileno())
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        target.unlink(missing_ok=True)
        raise ChecksumError(
            f"{source} is not a complete gzip file ({error}); delete it and run again"
        ) from None
    except BaseException:  # a full disk, Ctrl-C: the .gz stays, its half-unpacked copy goes
        target.unlink(missing_ok=True)
        raise
    return Digest(size, hasher.hexdigest())


def verify_existing(final: Path, remote: RemoteFile, url: str, *, verbose: bool) -> None:
    """Check a final file against its record; give a hand-copied file (no record) one."""
    record_path = record_file(final)
    if record_path.exists():
        record = read_record(record_path)
        check_digest(
            hash_file(final, verbose=verbose), RemoteFile(final.name, record.size, record.sha256),
            what=f"{final} (against {record_path}; delete both to download again)",
        )
        say(f"{final}: present and matches {record_path.name}", verbose)
        return
    digest = hash_file(final, verbose=verbose)
    if remote.gzipped:  # the manifest describes the .gz, not what it unpacks to
        record = Record(final.name, digest.size, digest.sha256, remote.name, None, None, False, url)
    else:
        check_digest(digest, remote, what=f"{final} (delete it to download again)")
        record = Record(
            final.name, digest.size, digest.sha256, remote.name, digest.size, digest.sha256, known(remote), url
        )
    write_record(final, record)
    verdict = "matches the manifest" if record.source_checked_against_manifest else "unchecked"
    say(f"{final}: recorded its size and sha256 ({verdict})", verbose)


def check_source(served: Path, remote: RemoteFile, *, verbose: bool) -> Digest:
    digest = hash_file(served, verbose=verbose)
    check_digest(digest, remote, what=f"{served} (delete it to download again)")
    return digest


def check_digest(digest: Digest, expected: RemoteFile, *, what: str) -> None:
    problems = []
    if expected.size is not None and digest.size != expected.size:
        problems.append(f"size {digest.size} bytes, expected {expected.size}")
    if expected.sha256 is not None and digest.sha256 != expected.sha256:
        problems.append(f"sha256 {digest.sha256}, expected {expected.sha256}")
    if problems:
        raise ChecksumError(f"{what}: " + "; ".join(problems))


def known(remote: RemoteFile) -> bool:
    """Whether the manifest pins this file at all (a check against nothing proves nothing)."""
    return remote.size is not None or remote.sha256 is not None


def hash_file(path: Path, *, verbose: bool) -> Digest:
    size = path.stat().st_size
    with Progress(f"sha256 {path.name}", total=size, unit="B", enabled=verbose) as bar:
        hasher = hash_prefix(path, size, bar)
    return Digest(size, hasher.hexdigest())


def hash_prefix(path: Path, length: int, bar: Progress | None = None) -> hashlib._Hash:
    hasher = hashlib.sha256()
    if length:
        with open(path, "rb") as file:
            while length and (chunk := file.read(min(CHUNK, length))):
                hasher.update(chunk)
                length -= len(chunk)
                if bar:
                    bar.update(len(chunk))
    return hasher


def write_record(final: Path, record: Record) -> None:
    write_json(record_file(final), asdict(record))


def read_record(path: Path) -> Record:
    """NAME.sha256.json; ValueError naming it if it is damaged (delete it, and the file, to start over)."""
    values = read_json(path)
    fields = set(Record.__dataclass_fields__)
    if not isinstance(values, dict) or set(values) != fields:
        raise ValueError(f"{path}: not a download record (expected the keys {sorted(fields)}); "
                         "delete it and the file it describes to download again")
    return Record(**values)


def read_part_state(part: Path) -> dict | None:
    """NAME.part.json: the url, validator and announced size of the file part was started from."""
    path = part_state_file(part)
    try:
        state = read_json(path) if path.exists() else None
    except ValueError:  # a damaged record only costs a fresh start
        return None
    return state if isinstance(state, dict) and {"url", "validator", "size"} <= state.keys() else None


def write_part_state(part: Path, state: dict) -> None:
    write_json(part_state_file(part), state)


def finish(part: Path, target: Path) -> None:
    """Rename a complete, checked part to its final name and drop its state."""
    os.replace(part, target)
    part_state_file(part).unlink(missing_ok=True)


def discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    part_state_file(part).unlink(missing_ok=True)


def part_state_file(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def record_file(final: Path) -> Path:
    return final.with_name(final.name + ".sha256.json")


def partial(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def say(message: str, verbose: bool) -> None:
    if verbose:
        print(message, file=sys.stderr)
