"""Storage and media I/O, free of Ray and of models.

- `kvray.io.storage`: fsspec filesystems, atomic writes, JSON, safe names, storage options.
- `kvray.io.images`: user images (path, URL, fsspec URI) as RGB.
- `kvray.io.video`: frames (uint8 `f h w c` RGB) to mp4 / GIF / WebP bytes and back.

Import the submodule you need: `storage` does not pull in PyAV or Pillow.
"""
