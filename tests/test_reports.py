"""Result CSVs, Table-1 style summaries, figures and TensorBoard logging."""

import math
import struct

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from agejax.reports import plots, tables
from agejax.reports import tensorboard as tb

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(trials=((0, 1), (3, 4), (12, 2), (99, 1)), priors=("dex", "vgg_face"), seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for p, prior in enumerate(priors):
    for n, count in trials:
      for t in range(count):
        rows.append({"prior": prior, "n_train": n, "trial": t, "seed": 100 * n + t, "mae": 5.0 + 10 * p - n / 50
                     + rng.normal(0, 0.3), "eps_error": float("nan"), "cs5": rng.uniform(), "plcc": rng.uniform(),
                     "srocc": rng.uniform(), "steps": 5 * n, "wall_s": 0.5})
  return rows


def test_csv_roundtrip_append_and_resume(tmp_path):
  path = tmp_path / "sub" / "results.csv"
  rows = _rows()
  tables.append_results(path, rows[:3])
  tables.append_results(path, rows[3:])
  text = path.read_text().splitlines()
  assert text[0].split(",") == list(tables.RESULT_FIELDS)
  assert sum(line.startswith("prior,") for line in text) == 1
  back = tables.read_results(path)
  assert len(back) == len(rows)
  assert back[4]["prior"] == "dex" and isinstance(back[4]["n_train"], int)
  assert back[4]["mae"] == rows[4]["mae"]  # floats survive exactly
  assert math.isnan(back[0]["eps_error"])


def test_append_with_extra_columns_and_partial_line(tmp_path):
  path = tmp_path / "results.csv"
  rows = _rows()
  tables.append_results(path, rows[:2])
  with open(path, "a") as f:
    f.write("dex,3,9,1,4.0")  # a row cut short by a crash
  tables.append_results(path, [{**rows[2], "train_loss": 1.25, "split_file": "splits/lap_3_0.txt"}])
  back = tables.read_results(path)
  assert len(back) == 3
  header = path.read_text().splitlines()[0].split(",")
  assert header[:len(tables.RESULT_FIELDS)] == list(tables.RESULT_FIELDS)
  assert header[-2:] == ["train_loss", "split_file"]
  assert back[0]["train_loss"] is None and back[2]["train_loss"] == 1.25
  assert back[2]["split_file"] == "splits/lap_3_0.txt"
  assert tables.read_results(tmp_path / "missing.csv") == []


def test_summarize_mean_sd_counts():
  rows = _rows()
  summary = tables.summarize(rows)
  maes = [r["mae"] for r in rows if r["prior"] == "dex" and r["n_train"] == 3]
  mean, sd, count = summary[("dex", 3)]["mae"]
  assert mean == pytest.approx(np.mean(maes))
  assert sd == pytest.approx(np.std(maes, ddof=1))
  assert count == 4
  mean0, sd0, count0 = summary[("dex", 0)]["mae"]
  assert count0 == 1 and math.isnan(sd0)
  assert summary[("dex", 3)]["eps_error"][2] == 0
  # A re-run trial replaces the earlier row instead of counting twice.
  redo = {**rows[1], "mae": 100.0}
  again = tables.summarize([*rows, redo])[("dex", 3)]["mae"]
  assert again[2] == 4 and again[0] == pytest.approx(np.mean([100.0, *maes[1:]]))


def test_table_markdown_layout():
  rows = _rows()
  text = tables.table_markdown(rows)
  lines = text.strip().splitlines()
  assert lines[0] == "| n_train | dex | vgg_face | trials |"
  assert [line.split("|")[1].strip() for line in lines[2:]] == ["0", "3", "12", "99"]
  s = tables.summarize(rows)[("vgg_face", 3)]["mae"]
  assert f"{s[0]:.3f} ± {s[1]:.3f}" in lines[3]
  assert lines[3].rstrip().endswith("| 4 |")
  assert "± -" in lines[2]  # one trial: no SD
  ragged = [r for r in rows if not (r["prior"] == "vgg_face" and r["n_train"] == 3 and r["trial"] > 0)]
  assert tables.table_markdown(ragged).splitlines()[3].rstrip().endswith("| 4/1 |")


def test_write_tables_sections(tmp_path):
  rows = _rows()
  text = tables.write_tables(tmp_path, rows).read_text()
  assert [h for h in text.splitlines() if h.startswith("## ")] == ["## MAE", "## CS@5", "## PLCC", "## SROCC"]
  rows[0]["eps_error"] = 0.4
  assert "## ε-error" in tables.write_tables(tmp_path, rows).read_text()


def _transfer_rows():
  return [{"run": f"{b}-{m}", "backbone": b, "arch": "vgg16", "mode": m, "test_mae": 7.25 + i / 3, "plcc": 0.5,
           "srocc": float("nan"), "cs5": 0.25, "val_mae": 6.0, "best_epoch": 1.5, "epochs_run": 2.0,
           "stopped_early": i == 1, "train_images": 64, "val_images": 32, "test_images": 40, "trainable_params": 1234,
           "backbone_max_change": 0.0, "train_wall_s": 12.6, "checkpoint": f"checkpoints/{b}-{m}"}
          for i, (b, m) in enumerate([("7", "frozen"), ("7", "full")])]  # a backbone named like a number stays text


def test_one_csv_writer_for_other_columns(tmp_path):
  """The transfer study's rows: its own columns first, same cells, read back with its text fields as str."""
  from agejax.experiments import transfer

  path = tmp_path / "results.csv"
  rows = _transfer_rows()
  tables.append_results(path, rows[:1], transfer.RESULT_FIELDS)
  tables.append_results(path, rows[1:], transfer.RESULT_FIELDS)
  lines = path.read_text().splitlines()
  assert lines[0].split(",") == list(transfer.RESULT_FIELDS) and len(lines) == 3
  assert lines[2].startswith("7-full,7,vgg16,full,7.583333333333333,0.5,nan,0.25,6.0,1.5,2.0,True,64,")
  back = tables.read_results(path, transfer.TEXT_FIELDS)
  assert [(r["run"], r["backbone"], r["mode"]) for r in back] == [("7-frozen", "7", "frozen"), ("7-full", "7", "full")]
  assert back[1]["test_mae"] == rows[1]["test_mae"] and back[1]["trainable_params"] == 1234
  assert tables.read_results(path)[0]["backbone"] == 7  # without the text fields: a number


def test_transfer_table(tmp_path):
  text = tables.write_transfer_table(tmp_path, _transfer_rows(), "Transfer")
  assert (tmp_path / "table.md").read_text() == text
  lines = text.splitlines()
  assert lines[0] == "# Transfer"
  assert "| 7 | Linear layers fine-tuned | 7.250 | 0.500 | - | 0.250 | 6.000 | 1.5 / 2.0 | 13 |" in lines
  assert "| 7 | All layers fine-tuned | 7.583 |" in text


def test_workdir_input_writers(tmp_path):
  import json

  import ml_collections

  from agejax.data.records import Rejections
  from agejax.reports import workdir as workdir_lib

  cfg = ml_collections.ConfigDict(dict(seed=3, data=dict(name="synthetic")))
  path = workdir_lib.write_config(str(tmp_path / "w"), cfg)
  assert open(path).read() == cfg.to_json_best_effort(indent=2) and path.endswith("w/config.json")
  workdir_lib.write_config(str(tmp_path / "d"), {"seed": 1})
  assert (tmp_path / "d" / "config.json").read_text() == '{"seed": 1}'
  rejections = Rejections("skip")
  rejections.flag("a.jpg", "unreadable")
  workdir_lib.write_data_files(str(tmp_path / "w"), rejections, {"pool": 3, "path": tmp_path})
  assert json.loads((tmp_path / "w" / "data_report.json").read_text())["by_reason"]["unreadable"]["files"] == ["a.jpg"]
  assert (tmp_path / "w" / "data_info.json").read_text() == json.dumps({"pool": 3, "path": str(tmp_path)}, indent=2)


def test_split_writers_bytes(tmp_path):
  from agejax.reports import workdir as workdir_lib

  names, ages = ["a/1.jpg", "b 2.png"], np.array([23.7, 1.0], np.float32)
  path = workdir_lib.write_test_split(str(tmp_path), names, ages)
  assert path == str(tmp_path / "splits" / "test.txt")
  assert (tmp_path / "splits" / "test.txt").read_bytes() == b"# fixed test set: 2 images\na/1.jpg\t23.7\nb 2.png\t1\n"
  rel = workdir_lib.write_trial_split(str(tmp_path), "dex", 12, 3, "# head\nx\t4\n")
  assert rel == workdir_lib.trial_split_file("dex", 12, 3) == "splits/dex/n00012/trial03.txt"
  assert (tmp_path / rel).read_text() == "# head\nx\t4\n"
  with pytest.raises(ValueError):
    workdir_lib.split_lines(names, ages[:1])  # a name without its age


def _is_png(path):
  return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_learning_curve_points_and_file(tmp_path):
  rows = _rows()
  rows.append({**rows[0], "trial": 7, "mae": float("nan")})  # a diverged trial is not drawn
  fig = plots.learning_curve_figure(rows, baselines={"train mean": 12.0})
  ax = fig.axes[0]
  trial_points = sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == plots.TRIAL_GID)
  assert trial_points == len(rows) - 1
  labels = [t.get_text() for t in ax.get_xticklabels()]
  assert labels == ["0", "3", "12", "99"]
  assert ax.get_xscale() == "log"
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert {"dex", "vgg_face", "train mean"} <= set(legend)
  path = plots.plot_learning_curve(rows, tmp_path / "curve.png", metric="plcc")
  assert _is_png(path)


def test_scatter_highlights_gross_errors(tmp_path):
  rng = np.random.default_rng(3)
  true = rng.uniform(0, 90, 400)
  pred = true + rng.normal(0, 4, 400)
  pred[:7] += 45
  fig = plots.scatter_figure(pred, true)
  ax = fig.axes[0]
  sizes = [len(c.get_offsets()) for c in ax.collections]
  assert sizes == [393, 7]
  assert any(t.get_text().startswith("fit") for t in ax.get_legend().get_texts())
  assert _is_png(plots.plot_scatter(pred, true, tmp_path / "scatter.png"))


def test_age_histograms(tmp_path):
  rng = np.random.default_rng(4)
  ages = {"imdb": rng.integers(0, 101, 2000), "lap": rng.integers(10, 60, 300)}
  fig = plots.age_histograms_figure(ages, panels=True)
  assert len(fig.axes) == 2
  assert _is_png(plots.plot_age_histograms(ages, tmp_path / "hist.png"))


def _events(logdir):
  """Parses every TFRecord in the event files under logdir (8-byte length, crc, payload, crc)."""
  events = []
  for path in logdir.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events


def test_logger_writes_tags(tmp_path):
  fig = plots.scatter_figure([1.0, 2.0, 3.0], [1.0, 2.5, 2.0])
  with tb.Logger(tmp_path, enabled=True) as log:
    log.scalar("train/loss", np.float32(1.5), 3)
    log.scalars("eval", {"mae": 4.0, "plcc": np.float64(0.5), "note": "skip", "none": None}, 10)
    log.image("img/array", np.zeros((8, 6, 3), np.uint8), 0)
    log.figure("img/scatter", fig, 1)
  png = tmp_path / "a.png"
  fig.savefig(png)
  with tb.Logger(tmp_path / "file", enabled=True) as log:
    log.image("img/file", png, 0)
  values = {(v.tag, e.step): v for e in _events(tmp_path) for v in e.summary.value}
  assert values[("train/loss", 3)].simple_value == pytest.approx(1.5)
  assert values[("eval/mae", 10)].simple_value == pytest.approx(4.0)
  assert ("eval/plcc", 10) in values and ("eval/note", 10) not in values
  assert values[("img/array", 0)].image.height == 8 and values[("img/array", 0)].image.width == 6
  assert values[("img/scatter", 1)].image.encoded_image_string[:8] == PNG_MAGIC
  assert any(v.tag == "img/file" for e in _events(tmp_path / "file") for v in e.summary.value)


def test_logger_is_noop_off_process_zero(tmp_path, monkeypatch):
  monkeypatch.setattr(tb.jax, "process_index", lambda: 1)
  with tb.Logger(tmp_path / "other") as log:
    assert not log.enabled
    log.scalar("x", 1.0, 0)
    log.image("y", np.zeros((2, 2, 3), np.uint8), 0)
  assert not (tmp_path / "other").exists()
  monkeypatch.setattr(tb.jax, "process_index", lambda: 0)
  with tb.Logger(tmp_path / "main") as log:
    assert log.enabled
  with pytest.raises(ValueError):
    tb._as_hwc_uint8(np.zeros((2, 2, 5)))
