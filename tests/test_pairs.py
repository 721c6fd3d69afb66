"""The image–text pair stream of CLIP distillation: bad samples skipped and counted exactly, resume
bit-identical with and without DataLoader workers, fresh samples each epoch, disjoint CSV ranks,
CSV/TSV pools, one-line errors for bad pool specs, shard counts from sizes.json or a scan."""

from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gklcli.errors import GKLError
from gklcli.pairs import (BAD_REASONS, SYNTHETIC_CLASSES, PairBatches, clip_transform, open_pool, pool_size,
                          steps_per_epoch, write_synthetic_classification, write_synthetic_shards)

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
TRAIN = clip_transform(32, MEAN, STD, train=True)


def _tokens(captions: list[str]) -> torch.Tensor:
    """A trivial tokenizer: the first 12 characters' code points, zero-padded."""
    return torch.tensor([[ord(c) for c in caption[:12]] + [0] * (12 - len(caption[:12])) for caption in captions])


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["bad"] == y["bad"]
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["tokens"], y["tokens"])


def _keys(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def _total_bad(batches: list[dict]) -> dict[str, int]:
    return {reason: sum(batch["bad"][reason] for batch in batches) for reason in BAD_REASONS}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(folder, shards=3, per_shard=48, corrupt=5, empty_captions=4)
    return folder


# ---------------------------------------------------------------------------------------------------
# (a) bad samples and shards
# ---------------------------------------------------------------------------------------------------


def test_bad_samples_are_skipped_and_counted_exactly_over_a_pass(tmp_path):
    shard = write_synthetic_shards(tmp_path, shards=1, per_shard=40, corrupt=3, empty_captions=2, seed=4)[0]
    members = _members(shard)
    good_jpeg = _jpeg((200, 30, 30))
    injected = [("trunc.jpg", good_jpeg[: len(good_jpeg) // 2]), ("trunc.txt", b"a photo of a red square"),
                ("blank.jpg", good_jpeg), ("blank.txt", b"  \n\t"),
                ("lonely_image.jpg", good_jpeg), ("lonely_image.json", b"{}"),
                ("lonely_caption.txt", b"a caption without its image")]
    last = [("last.jpg", good_jpeg), ("last.txt", b"a photo of a red square")]
    _write_tar(shard, members[:60] + injected + members[60:] + last)  # 20 samples, the injected, 20, a good one
    (tmp_path / "sizes.json").unlink()
    pool = open_pool(shard)
    assert pool_size(pool) == 45  # keys counted by the scan, bad ones included

    batches = list(PairBatches(pool, TRAIN, _tokens, batch_size=6, steps=6, shuffle_buffer=1))
    assert _total_bad(batches) == {"image": 3 + 1, "caption": 2 + 1, "unpaired": 2, "shard": 0}
    keys = _keys(batches)
    assert len(keys) == len(set(keys)) == 36 and keys[-1] == "last"
    assert not {"trunc", "blank", "lonely_image", "lonely_caption"} & set(keys)
    assert all(batch["images"].shape == (6, 3, 32, 32) and batch["images"].dtype == torch.float32 for batch in batches)

    shuffled = list(PairBatches(pool, TRAIN, _tokens, batch_size=6, steps=20, shuffle_buffer=8, num_workers=2))
    assert set(_keys(shuffled)) <= set(keys) and sum(_total_bad(shuffled).values()) > 0


def test_a_truncated_or_garbage_shard_is_counted_and_the_stream_goes_on(tmp_path, shards):
    good = shards / "00000000.tar"
    data = good.read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2 + 300])
    (tmp_path / "garbage.tar").write_bytes(b"\x00\x01 not a tar" * 300)
    (tmp_path / "list.txt").write_text(f"{good}\ntruncated.tar\n# a comment\n\ngarbage.tar\n")
    pool = open_pool(tmp_path / "list.txt")
    sizes = [shard.size for shard in pool.shards]
    assert sizes[0] == 48 and 0 < sizes[1] < 48 and sizes[2] == 0  # scanned up to the damage; never drawn
    batches = list(PairBatches(pool, TRAIN, _tokens, batch_size=8, steps=20, shuffle_buffer=4, seed=3))
    assert _total_bad(batches)["shard"] >= 1 and len(_keys(batches)) == 160


def test_an_empty_shard_with_a_size_is_counted_and_never_hangs(tmp_path):
    import json
    import tarfile

    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    (tmp_path / "sizes.json").write_text(json.dumps({"empty.tar": 100}))  # a stale count: the shard is empty
    with pytest.raises(GKLError, match=r"1000 bad samples in a row \(the last: shard\)"):
        list(PairBatches(open_pool(tmp_path), TRAIN, _tokens, batch_size=4, steps=1))


def test_a_pool_where_every_sample_is_bad_stops_with_one_line(tmp_path):
    write_synthetic_shards(tmp_path, shards=1, per_shard=50, corrupt=50)
    with pytest.raises(GKLError, match=r"1000 bad samples in a row \(the last: image\); is every sample"):
        list(PairBatches(open_pool(tmp_path), TRAIN, _tokens, batch_size=4, steps=1))


# ---------------------------------------------------------------------------------------------------
# (b) resume
# ---------------------------------------------------------------------------------------------------


def test_a_resumed_stream_yields_the_uninterrupted_batches_bit_identically(shards):
    pool = open_pool(shards)
    settings = dict(batch_size=4, steps=9, seed=5, epoch=2, shuffle_buffer=16)
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    whole = list(PairBatches(pool, TRAIN, _tokens, **settings))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state  # no global RNG read
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert len(whole) == 9 and len(set(_keys(whole))) > 20 and sum(_total_bad(whole).values()) > 0
    for k in (1, 4, 8, 9):
        _same(list(PairBatches(pool, TRAIN, _tokens, start_batch=k, **settings)), whole[k:])


def test_resume_through_a_dataloader_with_two_workers(shards):
    pool = open_pool(shards)
    settings = dict(batch_size=4, steps=9, seed=5, epoch=2, shuffle_buffer=16, num_workers=2)

    def loaded(start: int) -> list[dict]:
        dataset = PairBatches(pool, TRAIN, _tokens, start_batch=start, **settings)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        assert len(loader) == 9 - start
        return list(loader)

    whole = list(PairBatches(pool, TRAIN, _tokens, **settings))  # the workers' round-robin, in-process
    _same(loaded(0), whole)
    _same(loaded(3), whole[3:])  # an odd start: worker 0 of the new loader serves lane 1
    one_stream = list(PairBatches(pool, TRAIN, _tokens, **(settings | {"num_workers": 0})))
    assert _keys(one_stream) != _keys(whole)  # two lanes are two independent streams


# ---------------------------------------------------------------------------------------------------
# (c) epochs, seeds and ranks
# ---------------------------------------------------------------------------------------------------


def test_each_epoch_is_a_fresh_sample_and_each_rank_its_own_stream(shards, tmp_path):
    pool = open_pool(shards)

    def keys(**changes) -> list[str]:
        settings = dict(batch_size=8, steps=6, seed=0, epoch=0, shuffle_buffer=32) | changes
        return _keys(list(PairBatches(pool, TRAIN, _tokens, **settings)))

    assert keys() == keys() and keys(epoch=1) == keys(epoch=1)
    assert keys() != keys(epoch=1) and set(keys()) != set(keys(epoch=1))
    assert keys() != keys(seed=1)
    assert keys(rank=0, world_size=2) != keys(rank=1, world_size=2)

    csv_pool = open_pool(_csv_set(tmp_path, 48))
    one_row, image = tmp_path / "one.csv", Image.new("RGB", (32, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 16, 16))
    image.save(tmp_path / "one.png")
    one_row.write_text("filepath,title\none.png,the only pair\n")
    crops = [b["images"] for b in PairBatches(open_pool(one_row), TRAIN, _tokens, batch_size=2, steps=4, num_workers=2)]
    assert not torch.equal(crops[0][0], crops[1][0])  # lanes 0 and 1: same image, counter 0, own crops
    assert not torch.equal(crops[0][0], crops[0][1])  # same lane, next counter
    later = [b["images"] for b in PairBatches(open_pool(one_row), TRAIN, _tokens, batch_size=2, steps=4, num_workers=2,
                                              epoch=1)]
    assert not torch.equal(crops[0][0], later[0][0])  # another epoch, other crops

    single = open_pool(shards / "00000001.tar")  # the shard draws cannot differ: only the shuffle buffer can
    shuffled = [_keys(list(PairBatches(single, TRAIN, _tokens, batch_size=8, steps=4, shuffle_buffer=16, seed=seed)))
                for seed in (0, 1)]
    assert shuffled[0] != shuffled[1] and shuffled[0] != sorted(shuffled[0])
    orders = [_keys(list(PairBatches(csv_pool, TRAIN, _tokens, batch_size=8, steps=6, epoch=epoch))) for epoch in (0, 1)]
    assert orders[0] != orders[1] and set(orders[0]) == set(orders[1])  # a CSV epoch: a fresh permutation of all rows
    halves = [keys_ for keys_ in (_keys(list(PairBatches(csv_pool, TRAIN, _tokens, batch_size=4, steps=6, rank=r,
                                                         world_size=2))) for r in (0, 1))]
    assert not set(halves[0]) & set(halves[1]) and len(set(halves[0] + halves[1])) == 48  # one permutation split


# ---------------------------------------------------------------------------------------------------
# (d) CSV/TSV pools and bad pool specs
# ---------------------------------------------------------------------------------------------------


def _csv_set(folder: Path, n: int, *, sep: str = ",", columns: tuple[str, str] = ("filepath", "title"),
             extra: tuple[tuple[str, str], ...] = ()) -> Path:
    """n images under folder/images and a CSV/TSV naming them by relative path, plus `extra` rows."""
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        (folder / "images" / f"{i:03d}.jpg").write_bytes(_jpeg((5 * i % 256, 100, 200)))
        rows.append((f"images/{i:03d}.jpg", f"a photo of thing {i}"))
    path = folder / ("pairs.tsv" if sep == "\t" else "pairs.csv")
    lines = [sep.join(columns)] + [sep.join(f'"{c}"' if sep in c else c for c in row) for row in rows + list(extra)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_and_tsv_pools_round_trip_with_relative_paths(tmp_path):
    absolute = tmp_path / "elsewhere.png"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(absolute)
    extra = ((str(absolute), "an absolute path, a comma"), ("images/missing.jpg", "no such file"), ("images/000.jpg", " "))
    (tmp_path / "c").mkdir()
    pool = open_pool(_csv_set(tmp_path / "c", 10, extra=extra))
    assert pool_size(pool) == 13 and pool.rows[10][2] == "an absolute path, a comma"
    batches = list(PairBatches(pool, TRAIN, _tokens, batch_size=11, steps=1))
    good = {f"images/{i:03d}.jpg" for i in range(10)} | {str(absolute)}
    assert set(_keys(batches)) == good  # one permutation holds each good row once
    assert batches[0]["images"].shape == (11, 3, 32, 32)
    assert _total_bad(batches)["image"] <= 1 and _total_bad(batches)["caption"] <= 1

    (tmp_path / "t").mkdir()
    tsv = open_pool(_csv_set(tmp_path / "t", 6, sep="\t", columns=("img", "cap")), image_key="img", caption_key="cap")
    whole = list(PairBatches(tsv, TRAIN, _tokens, batch_size=2, steps=7, epoch=3))
    assert set(_keys(whole[:3])) == {f"images/{i:03d}.jpg" for i in range(6)}  # then the next permutation
    _same(list(PairBatches(tsv, TRAIN, _tokens, batch_size=2, steps=7, epoch=3, start_batch=4)), whole[4:])


def test_bad_pool_specs_are_one_line_errors_naming_the_path_or_column(tmp_path):
    csv_path = _csv_set(tmp_path, 2)
    with pytest.raises(GKLError, match=r"pairs.csv: no column 'caption' \(columns: \['filepath', 'title'\]\)"):
        open_pool(csv_path, caption_key="caption")
    with pytest.raises(GKLError, match="nowhere/shards: pool not found"):
        open_pool(tmp_path / "nowhere" / "shards")
    with pytest.raises(GKLError, match=r"/\{00000..00003\}.tar: matches no existing shard"):
        open_pool(f"{tmp_path}/{{00000..00003}}.tar")
    with pytest.raises(GKLError, match="images: no .tar shards in this folder"):
        open_pool(tmp_path / "images")
    (tmp_path / "list.txt").write_text("gone.tar\n")
    with pytest.raises(GKLError, match=r"list.txt: matches no existing shard \(first: .*gone.tar\)"):
        open_pool(tmp_path / "list.txt")
    (tmp_path / "header.csv").write_text("filepath,title\n")
    with pytest.raises(GKLError, match="header.csv: no rows below the header"):
        open_pool(tmp_path / "header.csv")
    with pytest.raises(GKLError, match="fewer than one global batch of 64"):
        steps_per_epoch(63, 64)


# ---------------------------------------------------------------------------------------------------
# (e) shard counts; the synthetic sets; OpenCLIP's tokenizer and transforms
# ---------------------------------------------------------------------------------------------------


def test_sizes_json_stats_json_and_a_scan_agree(tmp_path):
    paths = write_synthetic_shards(tmp_path, shards=3, per_shard=17, corrupt=2, empty_captions=1)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {p.name: 17 for p in paths}
    from_sizes = open_pool(f"{tmp_path}/{{00000000..00000002}}.tar")
    (tmp_path / "sizes.json").unlink()
    scanned = open_pool(tmp_path)
    assert [s.size for s in scanned.shards] == [s.size for s in from_sizes.shards] == [17, 17, 17]
    assert pool_size(scanned) == pool_size(from_sizes) == 51
    (tmp_path / "00000001_stats.json").write_text(json.dumps({"count": 20, "successes": 16}))
    assert [s.size for s in open_pool(tmp_path).shards] == [17, 16, 17]  # img2dataset's count wins over a scan
    assert steps_per_epoch(None, 8, scanned) == 6 and steps_per_epoch(100, 8) == 12


def test_synthetic_shards_and_classification_images_are_the_same_kind(tmp_path):
    write_synthetic_shards(tmp_path / "s", shards=1, per_shard=20)
    captions = [data.decode() for name, data in _members(tmp_path / "s" / "00000000.tar") if name.endswith(".txt")]
    assert all(any(name in caption for name in SYNTHETIC_CLASSES) for caption in captions) and len(captions) == 20
    root = write_synthetic_classification(tmp_path / "c", per_class=2)
    folders = sorted(p.name for p in root.iterdir())
    assert folders == sorted(name.replace(" ", "_") for name in SYNTHETIC_CLASSES) and len(folders) == 10
    with Image.open(root / "red_circle" / "00001.jpg") as image:
        pixel = image.convert("RGB").getpixel((16, 16))
    assert image.size == (32, 32) and pixel[0] > 150 and pixel[1] < 90  # a red shape covers the centre
    assert not list(root.rglob("*.tmp")) and not list((tmp_path / "s").glob(".*"))


def test_openclip_tokenizer_and_transforms_match_openclip(shards):
    import open_clip

    from gklcli.models.clip import tokenizer

    tokenize = tokenizer("open_clip:gkl-tiny-clip")
    dataset = PairBatches(open_pool(shards), TRAIN, tokenize, batch_size=4, steps=2, num_workers=2)
    dataset = pickle.loads(pickle.dumps(dataset))  # spawn-started workers get a pickled copy
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2))
    assert batches[0]["tokens"].shape == (4, 16) and batches[0]["tokens"].dtype == torch.int64
    assert (batches[1]["tokens"][:, 0] == tokenize([""])[0, 0]).all()  # each caption starts with <start_of_text>

    image = Image.new("RGB", (48, 36), (10, 200, 30))
    image.paste((250, 0, 0), (5, 5, 30, 20))
    for seed in range(4):
        torch.manual_seed(seed)
        expected = open_clip.image_transform(32, is_train=True, mean=MEAN, std=STD)(image)
        assert torch.equal(TRAIN(image, torch.Generator().manual_seed(seed)), expected)
    evaluate = clip_transform(32, MEAN, STD, train=False)
    assert torch.equal(evaluate(image), open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)(image))
