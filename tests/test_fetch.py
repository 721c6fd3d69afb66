"""`gkl fetch` against a real HTTP server on 127.0.0.1 serving files the tests made: resume after a
connection dies halfway, checksums refused, atomic files, DM-AT's parts joined, teachers unpacked."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gklcli.download import download
from gklcli.errors import GKLError
from tests_helpers import run_cli


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` (path → bytes) with HTTP Range; `cut` (path → bytes) ends the first answer early."""

    files: dict[str, bytes] = {}
    cut: dict[str, int] = {}
    ranges: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.files.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        header = self.headers.get("Range")
        self.ranges.append(header or "")
        if header:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        limit = self.cut.pop(self.path, None)
        self.wfile.write(body[start:limit] if limit is not None else body[start:])
        if limit is not None:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    _Files.files, _Files.cut, _Files.ranges = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Files
    httpd.shutdown()


def test_a_download_killed_halfway_resumes_and_is_verified(server, tmp_path):
    url, files = server
    body = np.random.RandomState(0).bytes(3_000_000)
    files.files["/big.bin"], files.cut["/big.bin"] = body, 1_200_000
    dest = tmp_path / "big.bin"
    checksum = ("sha256", hashlib.sha256(body).hexdigest())
    with pytest.raises(GKLError, match="rerun to resume"):
        download(f"{url}/big.bin", dest, checksum=checksum, source="test")
    assert not dest.exists() and (tmp_path / "big.bin.part").stat().st_size == 1_200_000  # never under the final name
    seen = []
    download(f"{url}/big.bin", dest, checksum=checksum, source="test", progress=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == body and not (tmp_path / "big.bin.part").exists()
    assert files.ranges[-1] == "bytes=1200000-" and seen[-1] == (3_000_000, 3_000_000)  # continued, not restarted
    download(f"{url}/big.bin", dest, checksum=checksum, source="test")  # verified file: nothing fetched
    assert len(files.ranges) == 2


def test_a_wrong_checksum_is_refused_and_nothing_is_left(server, tmp_path):
    url, files = server
    files.files["/x.bin"] = b"tampered"
    with pytest.raises(GKLError, match=r"checksum mismatch \(md5 .*the download was removed"):
        download(f"{url}/x.bin", tmp_path / "x.bin", checksum=("md5", "0" * 32), source="test")
    assert list(tmp_path.iterdir()) == []


def test_cifar_through_the_cli_refuses_a_file_that_is_not_torchvisions(server, tmp_path, capsys):
    url, files = server
    files.files["/~kriz/cifar-10-python.tar.gz"] = b"not the archive"
    code, _, err = run_cli(capsys, "fetch", "cifar10", "--data-dir", tmp_path, "--mirror", url + "/", "-q")
    assert code == 2 and "cifar10: http://127.0.0.1" in err and "checksum mismatch" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "fetch", "cifar100", "--data-dir", tmp_path, "--mirror", url, "-q")
    assert code == 2 and "HTTP 404" in err and "download it by hand and put it at" in err and "cifar-100-python.tar.gz" in err
    assert not list(tmp_path.glob("*.tar.gz"))


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_cifar_is_unpacked_where_the_recipes_read(server, tmp_path, capsys, monkeypatch):
    from gklcli import fetch as fx

    url, files = server
    archive = _tar({"cifar-10-batches-py/batches.meta": b"meta", "cifar-10-batches-py/data_batch_1": b"d1"})
    files.files["/~kriz/cifar-10-python.tar.gz"] = archive
    monkeypatch.setitem(fx.CIFAR, "cifar10", (fx.CIFAR["cifar10"][0], hashlib.md5(archive).hexdigest(), "cifar-10-batches-py"))
    code, out, err = run_cli(capsys, "fetch", "cifar10", "--data-dir", tmp_path, "--mirror", url, "-q")
    assert code == 0, err
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes() == b"d1" and "ready:" in out


def _npz_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image=images, label=labels)
    return buffer.getvalue()


def test_dm_at_parts_are_fetched_from_the_hub_path_and_joined_into_one_memory_mapped_npz(server, tmp_path, capsys):
    from gklcli.data import load_npz

    url, files = server
    parts = [np.random.RandomState(i).randint(0, 256, (40 + i, 32, 32, 3)).astype(np.uint8) for i in (1, 2)]
    labels = [np.arange(len(p)) % 10 for p in parts]
    for i, (images, y) in enumerate(zip(parts, labels), 1):  # the path huggingface_hub's hf_hub_url gives
        files.files[f"/datasets/P2333/DM-Improves-AT/resolve/main/cifar10/20m_part{i}.npz"] = _npz_bytes(images, y)
    files.cut["/datasets/P2333/DM-Improves-AT/resolve/main/cifar10/20m_part2.npz"] = 5000  # one part dies halfway
    args = ["fetch", "generated", "cifar10_20m", "--data-dir", tmp_path, "--mirror", url, "-q"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "rerun to resume" in err
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    joined = load_npz(tmp_path / "generated" / "cifar10_20m.npz", 10, max_in_memory_gb=0.0)
    assert isinstance(joined.images, np.memmap)  # uncompressed: the recipes memory-map it
    np.testing.assert_array_equal(joined.images, np.concatenate(parts))  # DM-AT's merge order
    np.testing.assert_array_equal(joined.labels, np.concatenate(labels))
    assert not list((tmp_path / "generated").rglob("*.part")) and not list((tmp_path / "generated" / "parts").iterdir())
    code, _, err = run_cli(capsys, *args[:-1])  # without -q: the notes
    assert code == 0 and "already there (83 images)" in err.replace("\n", "")


def test_a_generated_part_with_wrong_images_is_refused(server, tmp_path, capsys):
    url, files = server
    files.files["/datasets/P2333/DM-Improves-AT/resolve/main/cifar100/1m.npz"] = _npz_bytes(
        np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64))
    code, _, err = run_cli(capsys, "fetch", "generated", "cifar100_1m", "--data-dir", tmp_path, "--mirror", url, "-q")
    assert code == 2 and "expected uint8 images of 32×32×3" in err
    assert not (tmp_path / "generated" / "cifar100_1m.npz").exists()


def _state_dict_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": {"fc.weight": torch.zeros(100, 4)}, "epoch": 240}, buffer)
    return buffer.getvalue()


def test_mdistiller_teachers_land_where_the_kd_recipes_look(server, tmp_path, capsys):
    from gklcli.fetch import CIFAR_TEACHERS
    from gklcli.recipes import RECIPES_DIR, load_recipe
    from gklcli.train.kd import resolve_teacher_path

    url, files = server
    files.files["/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"] = _tar(
        {f"cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth": _state_dict_bytes() for arch in CIFAR_TEACHERS})
    code, out, err = run_cli(capsys, "fetch", "teachers", "cifar100", "--data-dir", tmp_path, "--mirror", url, "-q")
    assert code == 0, err
    for recipe in sorted((RECIPES_DIR / "kd").glob("cifar100_*.yaml")):
        checkpoint = load_recipe(recipe).teacher.checkpoint
        assert resolve_teacher_path(checkpoint, str(tmp_path)).is_file(), recipe.name


def test_the_clip_teacher_lands_where_the_clip_recipes_look(server, tmp_path, capsys):
    from gklcli.fetch import CLIP_TEACHER
    from gklcli.models.clip import resolve_weights
    from gklcli.recipes import RECIPES_DIR, load_recipe

    url, files = server
    repo, filename, _ = CLIP_TEACHER
    buffer = io.BytesIO()
    torch.save({"logit_scale": torch.ones(())}, buffer)
    files.files[f"/{repo}/resolve/main/{filename}"] = buffer.getvalue()
    code, out, err = run_cli(capsys, "fetch", "teachers", "clip", "--data-dir", tmp_path, "--mirror", url, "-q")
    assert code == 0, err
    for recipe in sorted((RECIPES_DIR / "clip").glob("*.yaml")):
        checkpoint = load_recipe(recipe).teacher.checkpoint
        assert Path(resolve_weights(checkpoint, str(tmp_path))).is_file(), recipe.name
    files.files[f"/{repo}/resolve/main/{filename}"] = b"not a checkpoint"
    code, _, err = run_cli(capsys, "fetch", "teachers", "clip", "--data-dir", tmp_path / "bad", "--mirror", url, "-q")
    assert code == 2 and "not a checkpoint gkl can read" in err


def test_an_archive_member_outside_the_target_is_refused(server, tmp_path, capsys):
    url, files = server
    files.files["/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"] = _tar({"../escape.pth": b"x"})
    code, _, err = run_cli(capsys, "fetch", "teachers", "cifar100", "--data-dir", tmp_path / "d", "--mirror", url, "-q")
    assert code == 2 and "refusing member '../escape.pth'" in err
    assert not (tmp_path / "escape.pth").exists()


def test_licensed_datasets_say_what_to_get_and_a_folder_is_checked(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "fetch", "imagenet", "--data-dir", tmp_path)
    assert code == 2 and "needs a licence" in " ".join(out.split())
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (tmp_path / split / wnid).mkdir(parents=True)
            (tmp_path / split / wnid / "a.JPEG").write_bytes(b"")
    code, _, err = run_cli(capsys, "data", "check", "imagenet", "--data-dir", tmp_path)
    assert code == 2 and "train: 2 images, expected 1,281,167" in err and "expected 1000" in err
    code, _, err = run_cli(capsys, "data", "check", "imagenet-lt", "--data-dir", tmp_path)
    assert code == 2 and "ImageNet_LT_train.txt" in err and "not found" in err


def test_reproduce_fetch_gets_what_a_tables_runs_read_and_only_that(server, tmp_path, capsys):
    from gklcli.fetch import CIFAR_TEACHERS, Fetcher, fetch_for
    from gklcli.recipes import RECIPES_DIR, load_recipe

    url, files = server
    files.files["/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"] = _tar(
        {f"cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth": _state_dict_bytes() for arch in CIFAR_TEACHERS})
    files.files["/datasets/P2333/DM-Improves-AT/resolve/main/cifar10/1m.npz"] = _npz_bytes(
        np.zeros((6, 32, 32, 3), np.uint8), np.arange(6))
    recipes = [load_recipe(RECIPES_DIR / "kd" / "cifar100_res56_res20.yaml"), load_recipe(RECIPES_DIR / "cifar10_1m.yaml"),
               load_recipe(RECIPES_DIR / "quickstart.yaml")]
    fetched = fetch_for(recipes, Fetcher(tmp_path, url))
    assert (tmp_path / "generated" / "cifar10_1m.npz") in fetched
    assert (tmp_path / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth") in fetched
    requests = len(files.ranges)
    assert fetch_for(recipes, Fetcher(tmp_path, url)) == [] and len(files.ranges) == requests  # nothing twice
