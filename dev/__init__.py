"""kubetune's development tools (the `kubetune-dev` distribution, never in the product wheel or
images): a local Kubernetes stand-in with S3, the demo, and the test harness and fixtures."""
