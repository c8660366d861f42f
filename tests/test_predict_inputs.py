"""wbc_jax.predict's input checks, before any decoding or model."""

import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf

from wbc_jax import predict


def _png_header_only(path, width, height):
  """A PNG that declares width x height pixels and holds none: what a header check reads."""
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  chunk = lambda kind, data: (struct.pack('>I', len(data)) + kind + data
                              + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IEND', b''))


def test_a_huge_image_is_refused_from_its_header(tmp_path):
  big = tmp_path / 'big.png'
  _png_header_only(big, 20000, 20000)
  with pytest.raises(predict.PredictError, match='big.png: .*400000000 pixels.* before decoding'):
    predict.read_image(str(big))
  large = tmp_path / 'large.png'
  _png_header_only(large, 9000, 7000)      # below PIL's limit, above ours
  with pytest.raises(predict.PredictError, match='9000x7000 pixels, more than --max_pixels'):
    predict.read_image(str(large))


def test_tiny_missing_and_broken_images_are_refused(tmp_path):
  tiny = tmp_path / 'tiny.png'
  tiny.write_bytes(tf.io.encode_png(np.zeros((1, 1, 3), np.uint8)).numpy())
  with pytest.raises(predict.PredictError, match='1x1 pixels; expected at least 32'):
    predict.read_image(str(tiny))
  with pytest.raises(predict.PredictError, match='no such image file'):
    predict.read_image(str(tmp_path / 'gone.jpg'))
  (tmp_path / 'text.jpg').write_text('hello')
  with pytest.raises(predict.PredictError, match='not a readable image'):
    predict.read_image(str(tmp_path / 'text.jpg'))
  ok = tmp_path / 'ok.png'
  ok.write_bytes(tf.io.encode_png(np.full((40, 50, 3), 7, np.uint8)).numpy())
  assert predict.read_image(str(ok)).shape == (40, 50, 3)


def test_boxes_inverted_or_outside_the_image_are_refused():
  np.testing.assert_allclose(predict.parse_box_flag('48,64,240,320', (480, 640)),
                             [[0.1, 0.1, 0.5, 0.5]])
  with pytest.raises(predict.PredictError, match='ymin < ymax'):
    predict.parse_box_flag('240,64,48,320', (480, 640))
  with pytest.raises(predict.PredictError, match='outside the 640x480 image'):
    predict.parse_box_flag('500,700,600,800', (480, 640))
  with pytest.raises(predict.PredictError, match='four numbers'):
    predict.parse_box_flag('1,2,3', (480, 640))


def test_a_folder_without_images_is_an_error(tmp_path):
  (tmp_path / 'notes.txt').write_text('x')
  with pytest.raises(predict.PredictError, match='a folder with no image files'):
    predict.expand_paths([str(tmp_path)])
