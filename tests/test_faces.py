"""Face detection, landmarks and the crop conventions of agejax.data.faces, on scikit-image's astronaut."""

import os

import dlib
import numpy as np
import pytest
import skimage.data
from PIL import Image

from agejax.data import faces as F
from agejax.data.images import decode_image, resize_image
from agejax.data.records import Rejections
from agejax.errors import ConfigError, DatasetError

ASTRONAUT_FACE = (175, 76, 266, 167)  # marked by hand (left, top, right, bottom)


def iou(a, b) -> float:
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return w * h / (area(a) + area(b) - w * h)


@pytest.fixture(scope="module")
def astronaut():
  return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_face(astronaut):
  return F.FaceDetector()(astronaut)


def test_detector_finds_the_astronaut_face_and_its_landmarks(astronaut_face):
  assert len(astronaut_face) == 1  # not the mission patch (a HOG score ~0.05)
  face = astronaut_face[0]
  assert iou(face.box, ASTRONAUT_FACE) > 0.7
  assert len(face.landmarks) == 5
  for x, y in face.landmarks:
    assert face.box[0] <= x <= face.box[2] and face.box[1] <= y <= face.box[3]
  # dlib's order: the subject's right eye (image left) has the smaller x; the nose base is lowest.
  assert face.landmarks[2][0] < face.landmarks[0][0] and face.landmarks[4][1] > face.landmarks[0][1]


def test_no_face_in_a_face_free_photo():
  assert F.FaceDetector()(skimage.data.coffee()) == []


def test_large_photos_are_detected_on_a_shrunk_copy_in_original_pixels(astronaut, astronaut_face):
  big = resize_image(astronaut, 1536)
  found = F.FaceDetector(max_side=512)(big)
  assert len(found) == 1
  assert iou(found[0].box, [3 * v for v in astronaut_face[0].box]) > 0.8


def test_margin_and_border_conventions():
  img = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
  assert F.margin_box((4, 2, 14, 8), 0.5) == (-1, -1, 19, 11)
  rep = F.crop_box(img, (-2, 0, 5, 10), "replicate")
  assert rep.shape == (10, 7, 3)
  np.testing.assert_array_equal(rep[:, 0], img[:, 0])  # the left edge repeated
  np.testing.assert_array_equal(rep[:, 2:], img[:, :5])
  assert F.crop_box(img, (-2, 0, 5, 10), "clip").shape == (10, 5, 3)
  with pytest.raises(ValueError, match="outside"):
    F.crop_box(img, (30, 0, 40, 5))


def test_crop_face_per_convention(astronaut, astronaut_face):
  face = astronaut_face[0]
  box = F.crop_face(astronaut, face, F.FaceCrop("box_margin", margin=0.4), 64)
  want = resize_image(F.crop_box(astronaut, F.margin_box(face.box, 0.4)), 64)
  np.testing.assert_array_equal(box, want)
  # A face at the top edge, clipped: letterbox keeps the aspect ratio (replicated bands), squash does not.
  top = F.Face(box=(175, -40, 266, 60), landmarks=face.landmarks)
  clipped = F.crop_box(astronaut, F.margin_box(top.box, 0.0), "clip")
  assert clipped.shape[:2] == (60, 91)
  lb = F.crop_face(astronaut, top, F.FaceCrop("letterbox", border="clip"), 64)
  np.testing.assert_array_equal(lb, resize_image(clipped, 64, "letterbox"))
  assert (lb[0] == lb[1]).all() and not np.array_equal(lb, resize_image(clipped, 64))
  # aligned5 is dlib's own chip from the same landmarks; 'chip' on a photo is aligned5 with CHIP_PADDING.
  sp = F._landmark_predictor()
  r = face.box
  shape = sp(astronaut, dlib.rectangle(*(round(v) for v in (r[0], r[1], r[2] - 1, r[3] - 1))))
  ref = dlib.extract_image_chip(astronaut, dlib.get_face_chip_details(shape, 64, 0.2))
  np.testing.assert_array_equal(F.crop_face(astronaut, face, F.FaceCrop("aligned5", padding=0.2), 64), ref)
  chip = F.crop_face(astronaut, face, F.FaceCrop("chip"), 64)
  np.testing.assert_array_equal(chip, F.aligned_chip(astronaut, face.landmarks, 64, F.CHIP_PADDING))
  # face None: the image is already the face, resized whatever the convention.
  np.testing.assert_array_equal(F.crop_face(astronaut, None, F.FaceCrop("aligned5"), 32), resize_image(astronaut, 32))


def test_aligned_chip_undoes_rotation(astronaut, astronaut_face):
  crop = F.FaceCrop("aligned5", padding=0.3)
  upright = F.crop_face(astronaut, astronaut_face[0], crop, 64).astype(np.float32)
  rotated = np.asarray(Image.fromarray(astronaut).rotate(20, resample=Image.Resampling.BILINEAR))
  faces = F.FaceDetector(upsample=1)(rotated)
  assert faces, "dlib's HOG detector finds a face turned 20 degrees"
  again = F.crop_face(rotated, faces[0], crop, 64).astype(np.float32)
  unaligned = resize_image(F.crop_box(rotated, F.margin_box(faces[0].box, 0.3)), 64).astype(np.float32)
  assert np.abs(again - upright).mean() < 0.5 * np.abs(unaligned - upright).mean()


def test_face_crop_metadata():
  assert F.FaceCrop.from_metadata({}) == F.FaceCrop("chip")
  assert F.FaceCrop.from_metadata({"face_crop": {"convention": "aligned5", "padding": 0.2}}).padding == 0.2
  with pytest.raises(ConfigError, match="convention"):
    F.FaceCrop.from_metadata({"face_crop": {"convention": "tight"}})
  with pytest.raises(ConfigError, match="unknown field"):
    F.FaceCrop.from_metadata({"face_crop": {"convention": "chip", "marg": 1}})


def test_crop_faces_names_every_rejection_and_caches(tmp_path, astronaut):
  Image.fromarray(astronaut).save(tmp_path / "astronaut.jpg")
  Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.jpg")
  (tmp_path / "empty.jpg").write_bytes(b"")
  (tmp_path / "cut.jpg").write_bytes((tmp_path / "astronaut.jpg").read_bytes()[:3000])
  paths = [str(tmp_path / n) for n in ("astronaut.jpg", "coffee.jpg", "empty.jpg", "cut.jpg", "gone.jpg")]
  crop = {"convention": "box_margin", "margin": 0.4}
  results = []
  for _ in range(2):  # decode and detect, then read the cache entry
    rej = Rejections("skip")
    results.append((F.crop_faces(paths, crop, 48, cache_dir=str(tmp_path / "cache"), rejections=rej,
                                 progress=False), rej))
  for (images, kept, boxes), rej in results:
    assert images.shape == (1, 48, 48, 3) and list(kept) == [0]
    assert iou(boxes[0], ASTRONAUT_FACE) > 0.7
    assert rej.examples == {F.NO_FACE: [paths[1]], "corrupt image": [paths[2], paths[3]],
                            "missing file": [paths[4]]}
  np.testing.assert_array_equal(results[0][0][0], results[1][0][0])
  np.testing.assert_array_equal(results[0][0][0][0], F.crop_face(decode_image(paths[0]), F.FaceDetector()(
      decode_image(paths[0]))[0], F.FaceCrop.from_metadata(crop), 48))
  assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")]) == 1
  with pytest.raises(DatasetError, match="coffee.jpg: no face found"):
    F.crop_faces(paths[:2], crop, 48, progress=False)


def test_utkface_chips_are_dlib_chips_with_chip_padding(utkface_root):
  """CHIP_PADDING: dlib's chip rectangle of a UTKFace chip's own landmarks covers the chip (docs/faces.md)."""
  names = sorted(os.listdir(utkface_root))[::1000][:20]
  pads = []
  for n in names:
    img = decode_image(os.path.join(utkface_root, n))
    found = F.FaceDetector()(img)
    if found:
      pts = [dlib.point(round(x), round(y)) for x, y in found[0].landmarks]
      r = dlib.get_face_chip_details(dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), pts), 200, 0.0).rect
      pads.append((img.shape[1] / r.width() - 1) / 2)
  assert len(pads) >= 15
  assert abs(np.median(pads) - F.CHIP_PADDING) < 0.05
