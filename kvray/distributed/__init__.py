"""The Ray renderer: Parquet manifests through GPU-pinned stage actors to videos in object storage.

The only package (with `jobs/`) that imports Ray.
"""
