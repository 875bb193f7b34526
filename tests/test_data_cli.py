"""`python -m agejax.data summarize` on a synthetic folder and on the real UTKFace folder."""

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from agejax.data.__main__ import main

REPO = os.path.join(os.path.dirname(__file__), "..")
REAL = os.path.join(REPO, "..", "shared", "data", "UTKFace")


def test_summarize_text_and_strict(tmp_path, capsys):
  jpeg = io.BytesIO()
  Image.new("RGB", (8, 8), (200, 100, 50)).save(jpeg, "JPEG")
  for n in ("20_0_0_20170104023102422.jpg.chip.jpg", "21_1_1_20170104023102423.jpg.chip.jpg",
            "39_1_20170116174525125.jpg.chip.jpg", "zz_0_1_1.jpg"):
    (tmp_path / n).write_bytes(jpeg.getvalue())  # the same (decodable) bytes in every file
  assert main(["summarize", "--format", "utkface", "--root", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "3 records" in out and "20-24" in out and "unparsable UTKFace name" in out
  assert "exact duplicates: 1 groups, 2 extra copies" in out
  assert main(["summarize", "--format", "utkface", "--root", str(tmp_path), "--policy", "strict"]) == 2
  assert "zz_0_1_1.jpg" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir(REAL), reason="real UTKFace folder (conftest.UTKFACE) absent")
def test_summarize_real_json():
  proc = subprocess.run([sys.executable, "-m", "agejax.data", "summarize", "--format", "utkface", "--root", REAL,
                         "--json"], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": os.path.abspath(REPO)})
  assert proc.returncode == 0, proc.stderr
  s = json.loads(proc.stdout)
  assert s["records"] == 23707 and sum(s["age"]["bins"].values()) == 23707
  assert s["duplicates"]["exact"]["groups"] == 375 and s["duplicates"]["exact"]["extra_copies"] == 390
  assert s["rejections"]["by_reason"]["warning: 3-field name, race unknown (kept)"]["count"] == 3
  assert s["age"]["bins"]["0-4"] > 0 and s["gender"]["M"] + s["gender"]["F"] == 23707
