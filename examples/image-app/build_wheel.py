"""Builds dist/app-VERSION-py3-none-any.whl from app/ with the standard library alone.

A real project runs `python -m build`; this example's image has no pip and no network, and a
wheel is only a zip file with a METADATA, a WHEEL and a RECORD. Timestamps are fixed, so the
same sources always give the same bytes.
"""

import base64
import hashlib
import os
import sys
import zipfile

version = sys.argv[1] if len(sys.argv) > 1 else "1.2.3"
info = f"app-{version}.dist-info"
files = {}
for name in sorted(os.listdir("app")):
    if name.endswith(".py"):
        with open(os.path.join("app", name), "rb") as f:
            files[f"app/{name}"] = f.read()
files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: app\nVersion: {version}\nSummary: cib's image-app example\n".encode()
files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: build_wheel.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
record = ""
for path, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record += f"{path},sha256={digest},{len(data)}\n"
record += f"{info}/RECORD,,\n"
files[f"{info}/RECORD"] = record.encode()
os.makedirs("dist", exist_ok=True)
out = f"dist/app-{version}-py3-none-any.whl"
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for path, data in files.items():
        z.writestr(zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
print(f"built {out}")
