"""The few Caffe protobuf messages a `.caffemodel` reader needs, described in Python (no protoc).

Field numbers are those of caffe.proto; every other field of a real file is an unknown field to this
description, and protobuf skips it when parsing.

Two descriptions of the same messages: `TYPED` declares blob data as packed floats, as caffe.proto does;
`RAW` declares the same fields as repeated bytes. A packed field and a bytes field share one wire encoding
(length-delimited), so `RAW` reads a blob's packed payload as little-endian float32 bytes for
`np.frombuffer` and writes it from `ndarray.tobytes()`, which for a 100M-value fc6 is seconds instead of
minutes. Unpacked data (wire type 5) does not match the bytes field and is left to `TYPED`.
"""

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto

# V1LayerParameter.LayerType values of the layers a weight port cares about.
V1_LAYER_TYPES = {4: "Convolution", 14: "InnerProduct", 39: "Deconvolution"}


def _message(file: descriptor_pb2.FileDescriptorProto, name: str,
             fields: list[tuple[str, int, int, int, str | None, bool]]) -> None:
  msg = file.message_type.add(name=name)
  for fname, number, ftype, label, type_name, packed in fields:
    field = msg.field.add(name=fname, number=number, type=ftype, label=label)
    if type_name:
      field.type_name = type_name
    if packed:
      field.options.packed = True


def _build(raw: bool) -> dict[str, Any]:
  file = descriptor_pb2.FileDescriptorProto(name="agejax_caffe_subset.proto", package="agejax_caffe",
                                            syntax="proto2")
  opt, rep = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
  _message(file, "BlobShape", [("dim", 1, _F.TYPE_INT64, rep, None, True)])
  _message(file, "BlobProto", [
      ("num", 1, _F.TYPE_INT32, opt, None, False),
      ("channels", 2, _F.TYPE_INT32, opt, None, False),
      ("height", 3, _F.TYPE_INT32, opt, None, False),
      ("width", 4, _F.TYPE_INT32, opt, None, False),
      ("data", 5, _F.TYPE_BYTES if raw else _F.TYPE_FLOAT, rep, None, not raw),
      ("shape", 7, _F.TYPE_MESSAGE, opt, ".agejax_caffe.BlobShape", False),
      ("double_data", 8, _F.TYPE_BYTES if raw else _F.TYPE_DOUBLE, rep, None, not raw),
  ])
  _message(file, "LayerParameter", [
      ("name", 1, _F.TYPE_STRING, opt, None, False),
      ("type", 2, _F.TYPE_STRING, opt, None, False),
      ("blobs", 7, _F.TYPE_MESSAGE, rep, ".agejax_caffe.BlobProto", False),
  ])
  # The enum `type` is read as its integer value (same varint wire encoding).
  _message(file, "V1LayerParameter", [
      ("name", 4, _F.TYPE_STRING, opt, None, False),
      ("type", 5, _F.TYPE_INT32, opt, None, False),
      ("blobs", 6, _F.TYPE_MESSAGE, rep, ".agejax_caffe.BlobProto", False),
  ])
  _message(file, "NetParameter", [
      ("name", 1, _F.TYPE_STRING, opt, None, False),
      ("layers", 2, _F.TYPE_MESSAGE, rep, ".agejax_caffe.V1LayerParameter", False),
      ("layer", 100, _F.TYPE_MESSAGE, rep, ".agejax_caffe.LayerParameter", False),
  ])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"agejax_caffe.{m.name}"))
          for m in file.message_type}


TYPED = _build(raw=False)
RAW = _build(raw=True)
