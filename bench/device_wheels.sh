#!/usr/bin/env bash
# The wheels a GPU device call carries (git-excluded .whl/, under the 64 MiB a call may take): what the device
# image lacks of sdtune's needs (diffusers, pydantic and its parts, importlib_metadata) and bitsandbytes
# (NF4, 8-bit AdamW) cut to the CUDA 13 libraries (the image's torch is cu130: 7 MB instead of 43). wordfreq is
# too big to carry: the device scripts bring a stand-in. Run once here, then call the device with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@"
}
get diffusers==0.42.1 importlib_metadata==10.2.0 zipp pydantic==2.14.4 pydantic_core==2.50.5 annotated_types \
  typing_inspection typing_extensions==4.16.0
tmp=$(mktemp -d)
get bitsandbytes==0.50.2 -d "$tmp"
(cd "$tmp" && mkdir x && cd x && unzip -q ../bitsandbytes-*.whl \
  && rm -f bitsandbytes/libbitsandbytes_cuda1[12]*.so bitsandbytes/libbitsandbytes_rocm*.so bitsandbytes/libbitsandbytes_xpu*.so \
  && python3 -c "
import glob, os
rec = glob.glob('*.dist-info/RECORD')[0]
lines = [l for l in open(rec) if os.path.exists(l.split(',')[0])]
open(rec, 'w').writelines(lines)" \
  && rm -f "$root"/.whl/bitsandbytes-*.whl && zip -q -r "$root/.whl/$(basename ../bitsandbytes-*.whl)" .)
rm -rf "$tmp"
du -sh .whl && ls .whl
