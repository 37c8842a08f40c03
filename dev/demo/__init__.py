"""`make demo` (`python -m kubetune.dev.demo`) and the seeding of the local cluster's S3 with the
tiny model and captioned shapes."""
