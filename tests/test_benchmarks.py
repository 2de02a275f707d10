"""The benchmarks' shared timing helper, and that every benchmark script still imports (they are not run here: their
figures need an otherwise idle machine)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_meta import Episode

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import timing  # noqa: E402


def test_compare_alternates_the_contenders_round_by_round_after_untimed_warm_up_rounds():
    calls = []
    results = timing.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or 0.5}, rounds=3,
                             warmup=2)
    assert calls == ["a", "b"] * 5  # every round calls each contender once, in turn
    assert len(results["a"]) == len(results["b"]) == 3  # the warm-up rounds are not counted
    assert results["b"] == [0.5, 0.5, 0.5]  # a contender may report the seconds it measured itself


def test_compare_times_a_contender_that_reports_nothing_and_ratios_are_median_over_median():
    results = timing.compare({"slow": lambda: time.sleep(0.02), "fast": lambda: 0.005}, rounds=3, warmup=0)
    assert all(0.019 < t < 0.2 for t in results["slow"])
    assert results.median("fast") == 0.005
    assert results.ratio("slow", "fast") == pytest.approx(results.median("slow") / 0.005)


def test_the_table_prints_milliseconds_rates_and_the_ratio_against_the_baseline():
    results = timing.Results({"ours": [0.010, 0.012, 0.011], "theirs": [0.040, 0.044, 0.042]})
    lines = results.table(baseline="theirs", unit="step", work=4).splitlines()
    assert lines[0].split()[:6] == ["ours", "11.00", "ms/step", "363.6", "episodes/s", "3.82x"]
    assert lines[1].split()[:6] == ["theirs", "42.00", "ms/step", "95.2", "episodes/s", "1.00x"]
    assert "(rounds: 10.00, 12.00, 11.00)" in lines[0]


def test_median_time_skips_the_warm_up_calls_and_synchronises_around_each_timed_call():
    events = []
    seconds = timing.median_time(lambda i: events.append(i) or time.sleep(0.03 if i < 2 else 0.001), calls=7,
                                 warmup=2, synchronize=lambda: events.append("sync"))
    assert [e for e in events if e != "sync"] == list(range(7))
    assert events.count("sync") == 14
    assert seconds < 0.02  # the slow warm-up calls are left out of the median
    with pytest.raises(ValueError, match="calls > warmup"):
        timing.median_time(lambda i: None, calls=2, warmup=2)


def test_stopwatch_adds_up_separate_pieces_and_leaves_out_what_lies_between():
    clock = timing.Stopwatch()
    with clock:
        time.sleep(0.02)
    time.sleep(0.2)  # not timed
    clock.start()
    time.sleep(0.02)
    clock.stop()
    assert 0.039 < clock.wall < 0.15
    assert 0 <= clock.cpu < clock.wall


def test_float_images_gives_every_contender_the_same_float_inputs():
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    ep = Episode(images, torch.tensor([[0]]), images, torch.tensor([[0]]))
    out = timing.float_images(ep)
    assert out.support_x.tolist() == [[[0.0, 1.0]]] and out.support_y is ep.support_y
    assert timing.float_images(out) is out


def test_every_benchmark_script_imports():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 10
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code, *scripts], cwd=BENCHMARKS, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_bench_metadataset_writes_real_records_and_both_paths_read_the_same_pixels(tmp_path):
    """bench_metadataset.py's pieces at a tiny size (its full run needs an idle machine): the trees it writes are
    Meta-Dataset records the tfrecord package reads back, its index child times both indexers, and our encoded store
    and the port's path (tfrecord reader + PIL) give the same pixels for the same 84 px record, so their speeds compare
    like with like."""
    import io

    import bench_metadataset as bench
    import numpy as np
    from PIL import Image
    from tfrecord.reader import tfrecord_loader

    from lightning_meta.data import MetaDatasetRecords

    tree = tmp_path / "records" / "md84"
    info = bench.write_trees({tree: (3, 4, False)}, workers=1)[tree]
    assert info["records"] == 12 and 2000 < info["jpeg_bytes"] < 6000  # a realistic 84 px JPEG, not a solid colour
    records = [list(tfrecord_loader(str(tree / f"{c}.tfrecords"), None, {"image": "byte", "label": "int"}))
               for c in range(3)]
    assert [[int(r["label"][0]) for r in rs] for rs in records] == [[0] * 4, [1] * 4, [2] * 4]

    index = bench.child_index(str(tree), str(tmp_path / "cache"), str(tmp_path / "scratch"), str(tmp_path / "idx"))
    assert index["records"] == 12 and all(index[k] > 0 for k in ("ours_disk_s", "ours_cached_s", "port_disk_s"))
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["0.index", "1.index", "2.index"]

    ds = MetaDatasetRecords(tree, "train", store="encoded", cache=tmp_path / "cache")
    for i, record in enumerate(records[1]):  # class 1's records are items 4..7
        port = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB").resize((84, 84)), dtype=np.int16)
        assert np.abs(port - ds.images[4 + i].permute(1, 2, 0).numpy()).max() <= 1
    ours = next(iter(bench.RandomItems(ds, 0)))
    port = next(iter(bench.PortItems([str(tree / f"{c}.tfrecords") for c in range(3)],
                                     [str(tmp_path / "idx" / f"{c}.index") for c in range(3)], 0)))
    assert ours.shape == port.shape == (bench.BATCH, 3, 84, 84) and ours.dtype == port.dtype == torch.uint8
    memory, (fds, record_files) = bench.memory_mib(), bench.descriptors()
    assert memory["uss"] > 0 and memory["anon"] > 0 and fds > record_files >= 1  # the port's streams hold their files
