"""TensorBoard logging that only the first JAX process performs; on every other process each call is a no-op."""

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike


def figure_to_array(fig: Figure) -> np.ndarray:
  """Renders a matplotlib figure to an HWC uint8 RGB array on the Agg canvas (no pyplot involved)."""
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _as_hwc_uint8(image: ArrayLike | str | os.PathLike) -> np.ndarray:
  """An image file path, or an HW / HWC array (uint8, or float in [0, 1]), as HWC uint8 with 1, 3 or 4 channels."""
  if isinstance(image, str | os.PathLike):
    from PIL import Image

    with Image.open(image) as img:
      array = np.asarray(img.convert("RGBA" if "A" in img.getbands() else "RGB"))
  else:
    array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got shape {array.shape}")
  if array.dtype != np.uint8:
    array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
  return array


class Logger:
  """A thin wrapper over tensorboardX's SummaryWriter, active only where jax.process_index() == 0.

  `enabled=None` decides by process index; pass True/False to force it. Usable as a context manager.
  """

  def __init__(self, logdir: str | os.PathLike, enabled: bool | None = None, flush_secs: int = 30):
    self.logdir = Path(logdir)
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self._writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      self.logdir.mkdir(parents=True, exist_ok=True)
      self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=flush_secs)

  def scalar(self, tag: str, value: Any, step: int) -> None:
    """Logs one number (Python, numpy or a fetched JAX scalar)."""
    if self._writer is not None:
      self._writer.add_scalar(tag, float(value), global_step=int(step))

  def scalars(self, tag_prefix: str, values: dict[str, Any], step: int) -> None:
    """Logs each numeric entry as '<tag_prefix>/<key>'; None and non-numeric values are skipped."""
    for key, value in values.items():
      if isinstance(value, bool) or value is None:
        continue
      if isinstance(value, int | float | np.number) or (hasattr(value, "shape") and np.ndim(value) == 0):
        self.scalar(f"{tag_prefix}/{key}" if tag_prefix else key, value, step)

  def image(self, tag: str, image: ArrayLike | str | os.PathLike, step: int) -> None:
    """Logs an HWC uint8 array (or HW, or float in [0, 1]) or a PNG/JPEG file."""
    if self._writer is not None:
      self._writer.add_image(tag, _as_hwc_uint8(image), global_step=int(step), dataformats="HWC")

  def figure(self, tag: str, fig: Figure, step: int) -> None:
    """Logs a rendered matplotlib figure."""
    if self._writer is not None:
      self.image(tag, figure_to_array(fig), step)

  def text(self, tag: str, text: str, step: int) -> None:
    """Logs text (Markdown renders in TensorBoard's text tab), e.g. a results table."""
    if self._writer is not None:
      self._writer.add_text(tag, text, global_step=int(step))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "Logger":
    return self

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               tb: TracebackType | None) -> None:
    self.close()
