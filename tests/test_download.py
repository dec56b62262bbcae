"""fnlm.download against a local HTTP server: resume, Range-less servers, corruption, gzip, offline."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fnlm.cli import main
from fnlm.download import (
    DATASETS,
    ChecksumError,
    DownloadError,
    Interrupted,
    RemoteFile,
    fetch_dataset,
    fetch_file,
)
from tests.full_disk import disk_full_after

TRAIN = bytes(range(256)) * 40  # 10,240 bytes: several reads, and a cut lands mid-file
VALID = b"Once upon a time there was a tiny valid split.\n<|endoftext|>\n" * 10


class FileServer:
    """Serves `files` on 127.0.0.1; knobs make it misbehave, `log` records every request.

    cuts: byte counts; the n-th response sends only cuts[n] body bytes, then drops the connection.
    honour_range: False answers every request with the whole file (200), as some servers do.
    honour_if_range: False serves a Range even when If-Range names another version.
    corrupt: flip one byte in the middle of every body.
    validators: "etag" (a strong ETag of the file's bytes), "weak-etag", "last-modified" or "none".
    """

    LAST_MODIFIED = "Tue, 01 Dec 2026 10:00:00 GMT"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.cuts: list[int] = []
        self.honour_range = True
        self.honour_if_range = True
        self.corrupt = False
        self.validators = "etag"
        self.log: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def version_headers(self, body: bytes) -> dict[str, str]:
        etag = f'"{sha256(body)[:16]}"'
        return {"etag": {"ETag": etag}, "weak-etag": {"ETag": "W/" + etag},
                "last-modified": {"Last-Modified": self.LAST_MODIFIED}, "none": {}}[self.validators]

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.removeprefix("/files/")
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                version = server.version_headers(body)
                if server.corrupt:
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
                requested, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                start = int(requested.removeprefix("bytes=").removesuffix("-")) if requested else 0
                entry = {"name": name, "range": requested, "sent": 0}
                if if_range is not None:
                    entry["if_range"] = if_range
                server.log.append(entry)
                same = if_range is None or not server.honour_if_range or if_range in version.values()
                use_range = requested and server.honour_range and same
                if use_range and start >= len(body):
                    entry["status"] = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    for key, value in version.items():
                        self.send_header(key, value)
                    self.end_headers()
                    return
                if use_range:
                    entry["status"] = 206
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    entry["status"] = 200
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                for key, value in version.items():
                    self.send_header(key, value)
                self.end_headers()
                if server.cuts:
                    body = body[: server.cuts.pop(0)]
                    self.close_connection = True
                self.wfile.write(body)
                entry["sent"] = len(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    files = {"TinyStoriesV2-GPT4-train.txt": TRAIN, "TinyStoriesV2-GPT4-valid.txt": VALID,
             "owt_train.txt.gz": gzip.compress(TRAIN), "owt_valid.txt.gz": gzip.compress(VALID)}
    server = FileServer(files)
    yield server
    server.close()


def fetch(server: FileServer, dest: Path, remote: RemoteFile | None = None, **options) -> Path:
    remote = remote or RemoteFile("TinyStoriesV2-GPT4-train.txt")
    return fetch_file(remote, dest, base_url=server.url, verbose=False, **{"retries": 0, **options})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".sha256.json").read_text())


def test_full_download_records_the_computed_checksum(server, tmp_path):
    train, valid = fetch_dataset("tinystories", tmp_path, base_url=server.url, verbose=False)
    assert train.read_bytes() == TRAIN and valid.read_bytes() == VALID
    assert record(train)["sha256"] == sha256(TRAIN) and record(train)["size"] == len(TRAIN)
    assert record(train)["source_checked_against_manifest"] is False  # the manifest pins nothing
    assert [entry["range"] for entry in server.log] == [None, None]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [train.name, valid.name, train.name + ".sha256.json", valid.name + ".sha256.json"]
    )


def cut_download(server: FileServer, dest: Path, at: int = 3000) -> Path:
    """A first download cut off after `at` bytes: NAME.part and NAME.part.json are left."""
    server.cuts = [at]
    with pytest.raises(Interrupted, match=f"after {at} of {len(TRAIN)} bytes"):
        fetch(server, dest)
    part = dest / "TinyStoriesV2-GPT4-train.txt.part"
    assert part.stat().st_size == at and part.with_name(part.name + ".json").exists()
    assert not (dest / "TinyStoriesV2-GPT4-train.txt").exists()
    return part


def test_a_cut_download_resumes_and_fetches_only_the_rest(server, tmp_path):
    cut_download(server, tmp_path)
    path = fetch(server, tmp_path, RemoteFile("TinyStoriesV2-GPT4-train.txt", len(TRAIN), sha256(TRAIN)))
    assert path.read_bytes() == TRAIN
    etag = server.version_headers(TRAIN)["ETag"]
    resumed = {"name": path.name, "range": "bytes=3000-", "if_range": etag, "status": 206, "sent": len(TRAIN) - 3000}
    assert server.log[-1] == resumed
    assert record(path)["source_checked_against_manifest"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".sha256.json"]  # no part state


@pytest.mark.parametrize("validators", ["etag", "last-modified"])
def test_a_file_changed_on_the_server_is_fetched_afresh_not_spliced(server, tmp_path, validators):
    """The issue's case: a .part of other bytes was resumed into a corrupt file with exit 0."""
    server.validators = validators
    cut_download(server, tmp_path)
    changed = TRAIN[::-1]
    server.files["TinyStoriesV2-GPT4-train.txt"] = changed
    if validators == "last-modified":
        server.LAST_MODIFIED = "Wed, 02 Dec 2026 10:00:00 GMT"
    assert fetch(server, tmp_path).read_bytes() == changed
    assert server.log[-1]["range"] == "bytes=3000-" and server.log[-1]["status"] == 200  # If-Range said no
    assert record(tmp_path / "TinyStoriesV2-GPT4-train.txt")["sha256"] == sha256(changed)


def test_a_206_for_another_version_starts_over(server, tmp_path):
    """A server that ignores If-Range still names its version (ETag) in the 206: refuse to splice."""
    cut_download(server, tmp_path)
    server.files["TinyStoriesV2-GPT4-train.txt"] = TRAIN[::-1]
    server.honour_if_range = False
    with pytest.raises(Interrupted, match="the file changed on the server since .*part was started; starting over"):
        fetch(server, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert fetch(server, tmp_path).read_bytes() == TRAIN[::-1]


@pytest.mark.parametrize("validators", ["weak-etag", "none"])
def test_a_part_without_a_validator_is_never_resumed(server, tmp_path, validators):
    server.validators = validators
    cut_download(server, tmp_path)
    (tmp_path / "TinyStoriesV2-GPT4-train.txt.part").write_bytes(b"stale bytes from another file")
    assert fetch(server, tmp_path).read_bytes() == TRAIN
    assert server.log[-1] == {"name": "TinyStoriesV2-GPT4-train.txt", "range": None, "status": 200, "sent": len(TRAIN)}


def test_a_part_left_by_hand_or_an_older_version_starts_over(server, tmp_path):
    (tmp_path / "TinyStoriesV2-GPT4-train.txt.part").write_bytes(b"stale bytes from another file")
    assert fetch(server, tmp_path).read_bytes() == TRAIN
    assert [(entry["range"], entry["status"]) for entry in server.log] == [(None, 200)]


def test_interruptions_are_retried_within_one_run(server, tmp_path):
    server.cuts = [1000, 2500]
    path = fetch(server, tmp_path, retries=2, retry_delay=0)
    assert path.read_bytes() == TRAIN
    assert [entry["range"] for entry in server.log] == [None, "bytes=1000-", "bytes=3500-"]


def test_a_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    cut_download(server, tmp_path)
    server.honour_range = False
    assert fetch(server, tmp_path).read_bytes() == TRAIN
    assert server.log[-1]["range"] == "bytes=3000-" and server.log[-1]["status"] == 200


def test_a_complete_part_file_is_finished_without_a_body(server, tmp_path):
    cut_download(server, tmp_path, at=len(TRAIN) - 1)
    with open(tmp_path / "TinyStoriesV2-GPT4-train.txt.part", "ab") as part:  # as if the last byte had arrived
        part.write(TRAIN[-1:])
    assert fetch(server, tmp_path).read_bytes() == TRAIN
    assert [entry["status"] for entry in server.log] == [200, 416]


def test_fewer_bytes_than_announced_is_never_accepted(server, tmp_path):
    server.cuts = [len(TRAIN) - 1]
    with pytest.raises(Interrupted, match=f"connection closed after {len(TRAIN) - 1} of {len(TRAIN)} bytes"):
        fetch(server, tmp_path)
    assert not (tmp_path / "TinyStoriesV2-GPT4-train.txt").exists()


def test_a_full_disk_names_the_part_keeps_it_and_a_rerun_finishes(server, tmp_path, monkeypatch):
    server.cuts = [4000]
    with pytest.raises(Interrupted):
        fetch(server, tmp_path)
    with disk_full_after(monkeypatch, 0), pytest.raises(OSError, match="no space left writing .*train.txt.part$"):
        fetch(server, tmp_path)
    assert (tmp_path / "TinyStoriesV2-GPT4-train.txt.part").stat().st_size == 4000
    assert fetch(server, tmp_path).read_bytes() == TRAIN
    assert [entry["range"] for entry in server.log] == [None, "bytes=4000-", "bytes=4000-"]


def test_corrupt_bytes_are_rejected_and_not_kept(server, tmp_path):
    server.corrupt = True
    with pytest.raises(ChecksumError, match=f"sha256 [0-9a-f]{{64}}, expected {sha256(TRAIN)}"):
        fetch(server, tmp_path, RemoteFile("TinyStoriesV2-GPT4-train.txt", sha256=sha256(TRAIN)))
    assert list(tmp_path.iterdir()) == []  # no final file, no record, no .part to resume from


def test_gz_files_are_gunzipped_and_removed(server, tmp_path):
    train, valid = fetch_dataset("owt", tmp_path, base_url=server.url, verbose=False)
    assert (train.name, valid.name) == ("owt_train.txt", "owt_valid.txt")
    assert train.read_bytes() == TRAIN and valid.read_bytes() == VALID
    assert record(train)["sha256"] == sha256(TRAIN)
    assert record(train)["source_sha256"] == sha256(server.files["owt_train.txt.gz"])
    assert not any(path.name.endswith((".gz", ".part")) for path in tmp_path.iterdir())


def test_a_truncated_gz_is_a_clear_error(server, tmp_path):
    (tmp_path / "owt_valid.txt.gz").write_bytes(server.files["owt_valid.txt.gz"][:-20])
    with pytest.raises(ChecksumError, match="owt_valid.txt.gz is not a complete gzip file"):
        fetch(server, tmp_path, DATASETS["owt"].splits["valid"])
    assert not (tmp_path / "owt_valid.txt").exists()


def test_reruns_verify_against_the_record_without_downloading(server, tmp_path):
    path = fetch(server, tmp_path)
    fetch(server, tmp_path)
    assert len(server.log) == 1
    path.write_bytes(TRAIN[:-1] + b"!")
    with pytest.raises(ChecksumError, match="sha256.json; delete both to download again"):
        fetch(server, tmp_path)


def test_a_damaged_record_is_named(server, tmp_path):
    path = fetch(server, tmp_path)
    record_path = path.with_name(path.name + ".sha256.json")
    for text, message in (('{"name": "x", "si', "not valid JSON"), ('{"name": "x"}', "not a download record")):
        record_path.write_text(text)
        with pytest.raises(ValueError, match=f"{record_path}: {message}"):
            fetch(server, tmp_path)


def test_a_file_copied_in_by_hand_is_checked_and_recorded(server, tmp_path):
    (tmp_path / "TinyStoriesV2-GPT4-valid.txt").write_bytes(VALID)
    fetch(server, tmp_path, RemoteFile("TinyStoriesV2-GPT4-valid.txt", len(VALID), sha256(VALID)))
    assert server.log == []
    assert record(tmp_path / "TinyStoriesV2-GPT4-valid.txt")["source_checked_against_manifest"] is True
    (tmp_path / "owt_valid.txt.gz").write_bytes(server.files["owt_valid.txt.gz"])  # gunzipped offline
    assert fetch(server, tmp_path, RemoteFile("owt_valid.txt.gz")).read_bytes() == VALID
    assert server.log == []


def test_offline_error_names_the_url_the_cause_and_the_manual_way(tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/files"
    with pytest.raises(DownloadError) as caught:
        fetch_dataset("owt", tmp_path, splits=["valid"], base_url=url, verbose=False)
    message = str(caught.value)
    assert f"{url}/owt_valid.txt.gz" in message and "refused" in message
    assert f"copy the file to {tmp_path / 'owt_valid.txt.gz'}" in message


def test_base_url_comes_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FNLM_DATA_BASE_URL", server.url)
    fetch_dataset("tinystories", tmp_path, splits=["valid"], verbose=False)
    assert [entry["name"] for entry in server.log] == ["TinyStoriesV2-GPT4-valid.txt"]


def test_cli(server, tmp_path, capsys):
    argv = ["data", "download", "tinystories", "--dest", str(tmp_path), "--base-url", server.url, "--quiet"]
    assert main(argv + ["--split", "valid"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "TinyStoriesV2-GPT4-valid.txt")
    assert main(argv[:-3] + ["--base-url", server.url + "/missing", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fnlm data download: error: cannot download ") and "HTTP 404" in err
    assert err.count("\n") == 1
