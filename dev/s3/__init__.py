"""The local S3 endpoint (moto's server behind waitress): `python -m kubetune.dev.s3.server HOST PORT`."""
