"""Storage and media I/O, free of Ray and of models.

- `kvray.io.opening`: a URI to an fsspec filesystem, with kvray's S3 retry policy.
- `kvray.io.atomic`: whole files (bytes, JSON) written atomically and read back.
- `kvray.io.failures`: storage failures told apart from missing files, in one line (`StorageError`).
- `kvray.io.names`: safe names for untrusted ids under a prefix.
- `kvray.io.storage_options`: storage options from `key=value` strings, secrets by `@env:` / `@file:`.
- `kvray.io.redaction`: secrets masked in options, URLs, jobs and command lines.
- `kvray.io.images`: user images (path, URL, fsspec URI) as RGB.
- `kvray.io.video`: frames (uint8 `f h w c` RGB) to mp4 / GIF / WebP bytes and back.

Import the submodule you need: the storage modules do not pull in PyAV or Pillow.
"""
