"""Images opened lazily (Zarr, OME-Zarr, TIFF through tifffile's Zarr view) whose headers are not believed: a header
that claims far more than the file holds, strings, a dataset path outside the store; and the temporaries of a Zarr
output whose run was killed, removed by the next run when their owner is provably dead (issue 21, items 9, 11, 14)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

zarr = pytest.importorskip("zarr")
pytest.importorskip("dask")

from napari_convlora.cli import main  # noqa: E402
from napari_convlora.io import safety  # noqa: E402
from napari_convlora.io.arrays import open_array  # noqa: E402
from napari_convlora.io.safety import (CLAIM_FREE_BYTES, CLAIM_FREE_CHUNKS, CLAIM_RATIO, process_ended,  # noqa: E402
                                       process_record)
from napari_convlora.io.zarr_outputs import clear_interrupted, create_output, remove_stale_temporaries  # noqa: E402
from napari_convlora.io.zarr_stores import OWNER_FILE, open_lazy, zarr_claim  # noqa: E402

FORGED_SIDE = 2**31 - 1


def _forged_zarr(path, zarr_format=2, shape=(10**6, 10**6), chunks=(1024, 1024)):
    """A ~200-byte header claiming ``shape`` uint8 in ``chunks``, and no chunk at all."""
    path.mkdir()
    if zarr_format == 2:
        meta = {"zarr_format": 2, "shape": list(shape), "chunks": list(chunks), "dtype": "|u1", "compressor": None,
                "fill_value": 0, "filters": None, "order": "C"}
        (path / ".zarray").write_text(json.dumps(meta))
    else:
        meta = {"zarr_format": 3, "node_type": "array", "shape": list(shape), "data_type": "uint8",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                "fill_value": 0, "codecs": [{"name": "bytes", "configuration": {}}]}
        (path / "zarr.json").write_text(json.dumps(meta))
    return path


def _forged_tiff(path, side=FORGED_SIDE, **options):
    """A 16 x 16 TIFF whose ImageWidth and ImageLength say ``side``: one strip (or tile) of at most 256 bytes."""
    tifffile.imwrite(path, np.arange(256, dtype=np.uint8).reshape(16, 16), photometric="minisblack", metadata=None,
                     **options)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tiff:
        for name in ("ImageWidth", "ImageLength"):
            tag = tiff.pages[0].tags[name]
            fmt = {3: "<H", 4: "<I"}[int(tag.dtype)]
            if fmt == "<H":
                pytest.skip("tifffile wrote the size as SHORT")
            data[tag.valueoffset:tag.valueoffset + 4] = struct.pack(fmt, side)
    path.write_bytes(bytes(data))
    return path


def _refusal(path) -> tuple[str, float]:
    start = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        open_lazy(path)
    return str(caught.value), time.perf_counter() - start


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_zarr_header_claiming_a_terabyte_over_an_empty_store_is_refused_in_seconds(tmp_path, zarr_format):
    message, seconds = _refusal(_forged_zarr(tmp_path / "forged.zarr", zarr_format))
    assert seconds < 5 and "\n" not in message
    assert "forged.zarr" in message and "1000000 x 1000000 uint8" in message and "1.0 TB" in message
    assert "954,529 chunks" in message and "holds 0 bytes of chunks" in message and f"{CLAIM_RATIO}" in message


@pytest.mark.parametrize("options", [{}, {"tile": (16, 16), "compression": "zlib"}], ids=["strips", "tiles"])
def test_a_tiff_forged_to_2_31_squared_is_refused_in_seconds(tmp_path, options):
    message, seconds = _refusal(_forged_tiff(tmp_path / "forged.tif", **options))
    assert seconds < 5 and "\n" not in message
    assert "forged.tif" in message and f"{FORGED_SIDE} x {FORGED_SIDE} uint8" in message and "strip" in message


def test_a_header_under_a_gigabyte_in_a_billion_missing_chunks_is_refused(tmp_path):
    """30000 x 30000 uint8 is 0.9 GB, believed by size; in 1 x 1 chunks (or 16 x 16 TIFF tiles) that are missing it
    would be hours of reading fill values: more than 10^6 chunks need 1/1000 of them present."""
    message, seconds = _refusal(_forged_zarr(tmp_path / "dust.zarr", 3, (30_000, 30_000), (1, 1)))
    assert seconds < 5 and "(900.0 MB in 900,000,000 chunks) but holds 0 bytes of chunks (0 files)" in message
    message, seconds = _refusal(_forged_tiff(tmp_path / "dust.tif", 30_000, tile=(16, 16), compression="zlib"))
    assert seconds < 5 and "(900.0 MB in 3,515,625 chunks)" in message and "in 1 chunks inside the file" in message


def test_a_store_of_more_than_a_million_chunks_needs_a_thousandth_of_them(tmp_path):
    count = CLAIM_FREE_CHUNKS + 1000  # 1,001,000 chunks of 1 byte: 1,001 must be present
    array = zarr.create_array(str(tmp_path / "many.zarr"), shape=(count, 1), chunks=(1, 1), dtype=np.uint8,
                              compressors=None, zarr_format=2)
    array[:1000] = 1
    message, _ = _refusal(tmp_path / "many.zarr")
    assert "holds 1,000 bytes of chunks (1,000 files)" in message and "1,001,000 chunks" in message
    array[1000] = 1
    assert open_lazy(tmp_path / "many.zarr").reader.shape == (count, 1)
    sharded = zarr.create_array(str(tmp_path / "sharded.zarr"), shape=(4096, 4096), chunks=(4, 4),
                                shards=(1024, 1024), dtype=np.uint8)
    assert zarr_claim(sharded).chunks == 16  # what is counted is files: shards, not the 10^6 chunks inside them


def test_the_command_line_refuses_a_forged_header_in_one_line(tmp_path, capsys):
    forged = _forged_zarr(tmp_path / "forged.zarr")
    code = main(["predict", "--model", str(tmp_path / "m.safetensors"), "--checkpoint", str(tmp_path / "sam.pth"),
                 "--image", str(forged), "--out", str(tmp_path / "out.zarr")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "forged.zarr" in err and "the header claims" in err
    assert not list(tmp_path.glob("*out.zarr*"))


def test_a_sparse_store_is_opened_while_it_holds_a_thousandth_of_what_it_claims(tmp_path):
    """The rule's boundary on a real store: 40000 x 40000 uint8 (1.6 GB, over the 1 GB that is always believed)
    with random (incompressible) chunks written; refused with one chunk, opened with enough of them."""
    side, chunk = 40_000, 512
    claimed = side * side
    assert claimed > CLAIM_FREE_BYTES
    array = zarr.create_array(str(tmp_path / "sparse.zarr"), shape=(side, side), chunks=(chunk, chunk),
                              dtype=np.uint8, zarr_format=3, compressors=None)
    rng = np.random.default_rng(0)
    array[:chunk, :chunk] = rng.integers(0, 255, (chunk, chunk), dtype=np.uint8)
    message, _ = _refusal(tmp_path / "sparse.zarr")
    assert "holds 262,144 bytes of chunks (1 file)" in message
    needed = -(-claimed // CLAIM_RATIO // chunk**2)  # chunks that hold a thousandth of the claim
    array[:chunk, :needed * chunk] = rng.integers(0, 255, (chunk, needed * chunk), dtype=np.uint8)
    assert open_lazy(tmp_path / "sparse.zarr").reader.shape == (side, side)


def test_compressed_and_multi_page_tiffs_are_judged_by_their_strip_and_tile_tables(tmp_path, monkeypatch):
    """With the free bound lowered to 1 MB: a smooth 2048 x 2048 tiled zlib TIFF (about 1/100 of its pixels' bytes
    on disk) and an uncompressed 8-page stack are opened."""
    monkeypatch.setattr(safety, "CLAIM_FREE_BYTES", 10**6)
    y, x = np.mgrid[:2048, :2048]
    smooth = ((x // 64 + y // 64) % 256).astype(np.uint8)
    tifffile.imwrite(tmp_path / "smooth.tif", smooth, tile=(256, 256), compression="zlib", photometric="minisblack")
    assert (tmp_path / "smooth.tif").stat().st_size < smooth.nbytes / 20
    assert open_lazy(tmp_path / "smooth.tif").reader.shape == (2048, 2048)
    stack = np.random.default_rng(2).integers(0, 255, (8, 512, 512), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    assert open_lazy(tmp_path / "stack.tif").reader.shape == (8, 512, 512)


def test_an_open_zarr_or_dask_array_with_a_forged_header_is_refused(tmp_path):
    da = pytest.importorskip("dask.array")
    forged = _forged_zarr(tmp_path / "forged.zarr", 3)
    for array in (zarr.open(str(forged), mode="r"), da.from_zarr(str(forged))):
        with pytest.raises(ValueError, match="'layer': the header claims 1000000 x 1000000 uint8"):
            open_array(array, "'layer'")
    assert open_array(da.from_zarr(str(forged))[:100, :100], "'crop'").reader.shape == (100, 100)


def test_a_store_of_strings_is_refused_in_one_line(tmp_path):
    zarr.create_array(str(tmp_path / "words.zarr"), shape=(4, 4), chunks=(2, 2), dtype=str, zarr_format=3)
    zarr.create_array(str(tmp_path / "fixed.zarr"), shape=(4, 4), chunks=(2, 2), dtype="<U4", zarr_format=2)
    for name in ("words.zarr", "fixed.zarr"):
        message, _ = _refusal(tmp_path / name)
        assert message.startswith(f"{tmp_path / name}: holds ") and "not image intensities" in message
    with pytest.raises(ValueError, match="'words': holds .* not image intensities"):
        open_array(np.array([["a", "b"], ["c", "d"]]), "'words'")


@pytest.mark.parametrize("dataset", ["/etc", "../other.zarr/0", "a/../../b", "missing", ""])
def test_an_ome_zarr_dataset_path_outside_the_store_or_missing_is_refused_in_one_line(tmp_path, dataset):
    zarr.create_array(str(tmp_path / "other.zarr"), shape=(8, 8), chunks=(4, 4), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(8, 8), chunks=(4, 4), dtype=np.uint8)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y"}, {"name": "x"}],
                                   "datasets": [{"path": dataset}]}]
    message, _ = _refusal(tmp_path / "img.ome.zarr")
    assert message.startswith(f"{tmp_path / 'img.ome.zarr'}: OME-Zarr 'multiscales' metadata") and "\n" not in message
    assert repr(dataset) in message


def test_real_images_open_as_before(tmp_path):
    image = np.arange(60 * 70, dtype=np.uint16).reshape(60, 70)
    zarr.create_array(str(tmp_path / "small.zarr"), shape=image.shape, chunks=(32, 32), dtype=image.dtype)[...] = image
    tifffile.imwrite(tmp_path / "small.tif", image, tile=(32, 32))
    for name in ("small.zarr", "small.tif"):
        lazy = open_lazy(tmp_path / name)
        assert np.array_equal(lazy.reader[...], image)


# ---- temporaries of interrupted runs ----


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporary(final, owner: dict | None, name: str = "abcd_123"):
    """A temporary store of ``final`` as an interrupted run leaves it (named as ``create_output`` names them), owned
    by ``owner`` (None: no owner file, as before owners were written)."""
    tmp = final.parent / f".{final.name}.{name}.tmp"
    (tmp / "0").mkdir(parents=True)
    (tmp / ".zarray").write_text("{}")
    if owner is not None:
        (tmp / OWNER_FILE).write_text(json.dumps(owner))
    return tmp


def test_a_record_tells_a_dead_process_from_a_live_one_and_another_host():
    me = process_record()
    assert me["pid"] == os.getpid() and me["host"] == socket.gethostname() and not process_ended(me)
    assert process_ended({**me, "pid": _dead_pid()})
    assert not process_ended({**me, "pid": _dead_pid(), "host": me["host"] + "-elsewhere"})
    assert not process_ended({}) and not process_ended({"pid": "12", "host": me["host"]})
    if me["pidns"] is not None:  # a container beside this one, under the same host name, has pids of its own
        assert not process_ended({**me, "pid": _dead_pid(), "pidns": "pid:[1]"})
    if me["start"] is not None:  # Linux: a pid reused since is told apart by its start time
        assert process_ended({**me, "start": me["start"] - 1})
    if me["boot"] is not None:  # a restart of this machine ended every process of the boot before
        assert process_ended({**me, "boot": "another-boot"})


def test_temporaries_of_a_killed_run_are_removed_by_the_next_run_and_said(tmp_path):
    final = tmp_path / "labels.zarr"
    code = ("import os, signal, numpy as np\n"
            "from napari_convlora.io.zarr_outputs import create_output\n"
            f"create_output({str(final)!r}, (8, 8), (4, 4), np.uint8)\n"
            f"create_output({str(final)!r}, (8, 8), (4, 4), np.uint8, zarr_format=3,\n"
            "              ome={'axes': [{'name': 'y'}, {'name': 'x'}], 'scale': [1, 1]})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL
    left = sorted(tmp_path.glob(".labels.zarr.*.tmp"))
    assert len(left) == 2
    live = _temporary(final, process_record(), "live0001")
    elsewhere = _temporary(final, {**process_record(), "pid": _dead_pid(), "host": "elsewhere"}, "elsewher")
    unknown = _temporary(final, None, "unknown1")
    other_output = _temporary(tmp_path / "labels.zarr.b.zarr", {**process_record(), "pid": _dead_pid()})
    message = clear_interrupted({"--out": final, "--instances": None})
    assert message == f"removed 2 temporaries of an interrupted run next to {final}"
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in (live, elsewhere, unknown, other_output))
    assert clear_interrupted({"--out": final}) == ""
    assert remove_stale_temporaries(tmp_path / "labels.zarr.b.zarr") == [other_output]


def test_a_committed_output_holds_no_owner_file(tmp_path):
    output = create_output(tmp_path / "out.zarr", (8, 8), (4, 4), np.uint8,
                           ome={"axes": [{"name": "y"}, {"name": "x"}], "scale": [1.0, 1.0]}, zarr_format=3)
    assert json.loads((output.tmp / OWNER_FILE).read_text())["pid"] == os.getpid()
    final = output.commit()
    assert not (final / OWNER_FILE).exists() and zarr.open_group(str(final), mode="r")["0"].shape == (8, 8)


def test_the_command_line_says_it_removed_temporaries_and_stops_cleanly_on_sigterm(tmp_path, capsys, monkeypatch):
    from napari_convlora.prediction.blockwise import run as blockwise

    image = tmp_path / "in.zarr"
    zarr.create_array(str(image), shape=(16, 16), chunks=(8, 8), dtype=np.uint8)
    final = tmp_path / "labels.zarr"
    stale = _temporary(final, {**process_record(), "pid": _dead_pid()})
    made = []

    class Source:
        @classmethod
        def of(cls, *args):
            return cls()

        def config(self):
            return None

    def terminated(source, image, out, *args):  # a run that SIGTERM reaches while its output is a temporary
        made.append(create_output(out, (16, 16), (8, 8), np.uint8))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            made[-1].discard()

    monkeypatch.setattr(blockwise, "ModelSource", Source)
    monkeypatch.setattr(blockwise, "predict_blockwise", terminated)
    monkeypatch.setattr("napari_convlora.prediction.blockwise.cluster.dask_client",
                        lambda *args: contextlib.nullcontext())
    before = signal.getsignal(signal.SIGTERM)
    code = main(["predict", "--model", str(tmp_path / "m.safetensors"), "--checkpoint", str(tmp_path / "sam.pth"),
                 "--image", str(image), "--out", str(final), "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"removed 1 temporary of an interrupted run next to {final}" in err and not stale.exists()
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err
    assert made and not made[0].tmp.exists() and not list(tmp_path.glob(".labels.zarr.*"))
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_result_whose_final_name_was_taken_meanwhile_is_kept_where_the_message_says(tmp_path):
    """commit said "the result is left in <tmp>" and the run's cleanup then deleted that folder."""
    final = tmp_path / "out.zarr"
    output = create_output(final, (8, 8), (8, 8), "uint8")
    final.mkdir()  # appeared while predicting
    with pytest.raises(FileExistsError, match="the result is left in"):
        output.commit()
    output.discard()
    assert output.tmp.is_dir()
