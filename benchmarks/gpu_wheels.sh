#!/usr/bin/env bash
# Fills .whl/ (git-ignored) at the project root with the Python 3.12 manylinux x86-64 wheels of
# what weat needs beyond a bare GPU image that has torch, torchvision, typer, rich, safetensors,
# numpy, scipy, matplotlib, scikit-learn, pytest and triton. Run it on a machine that reaches the
# package registry, then carry the checkout with .whl/ to the offline GPU machine and install with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
# (README.md, "On a GPU machine"). One version of each; extra names may be given as arguments.
#
#   benchmarks/gpu_wheels.sh                # the default set
#   benchmarks/gpu_wheels.sh einops         # ... plus einops
#   PYTHON=python3.12 benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT_MIB=${WHEELS_LIMIT_MIB:-40}  # the checkout and the wheels travel together under 64 MiB

names=(
  pydantic annotated-types typing-inspection typing-extensions  # weatcli.config (pydantic-core: pinned below)
  clean-fid requests urllib3 idna certifi charset-normalizer tqdm  # weat score: cleanfid.fid / .resize import these
  pyautoattack                                                  # weat attack -a autoattack / apgd-* / fab* / square
  torchattacks                                                  # benchmarks/bench_attack.py's baseline
  "$@"
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

download() {
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$tmp" "$@"
}

download "${names[@]}"

# pydantic requires one exact pydantic-core: read the pin from the wheel just fetched.
core_pin=$("$PY" - "$tmp" <<'EOF'
import re, sys, zipfile, pathlib
(wheel,) = pathlib.Path(sys.argv[1]).glob("pydantic-[0-9]*.whl")
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        m = re.match(r"Requires-Dist: pydantic[-_]core\s*\(?==\s*([^\s;,)]+)", line)
        if m:
            print(m.group(1))
            break
EOF
)
[ -n "$core_pin" ] || { echo "gpu_wheels: no pydantic-core pin found in the pydantic wheel" >&2; exit 1; }
download "pydantic-core==$core_pin"

# pyautoattack's wheel carries a 43 MB example checkpoint (examples/model_test.pt) that weat never
# imports; repack it without examples/ (and without their RECORD lines) so the wheels stay small.
"$PY" - "$tmp" <<'EOF'
import pathlib, sys, zipfile
for wheel in pathlib.Path(sys.argv[1]).glob("pyautoattack-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith("pyautoattack/examples/"):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True) if not l.startswith(b"pyautoattack/examples/"))
            dst.writestr(info, data)
    slim.replace(wheel)
EOF

# One version of each: the fresh set replaces whatever .whl/ held.
mkdir -p .whl
rm -f .whl/*.whl
mv "$tmp"/*.whl .whl/
ls -1 .whl
total_kib=$(du -sk .whl | cut -f1)
echo "gpu_wheels: $(ls .whl/*.whl | wc -l) wheels, $((total_kib / 1024)) MiB in .whl/"
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "gpu_wheels: .whl/ is over ${LIMIT_MIB} MiB; the checkout and the wheels must travel under 64 MiB" >&2
  exit 1
fi
