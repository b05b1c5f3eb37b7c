#!/usr/bin/env python3
"""Which kernel entry points changed since a git revision, without a GPU.

`python3 xtask/gpu/ptx_diff.py REV` compiles every `kandinsky-core/kernels/*.cu` of REV and of
the working tree to PTX (nvcc as build.rs runs it; source `../.cuda-env/env.sh` or set $NVCC)
and prints, per entry point, `identical`, `DIFFERENT` or `new`. Label numbers and the
"demoted" comments of shared arrays are normalised away, so an entry whose code is unchanged
reads `identical` even when other entries were added to its file (and the hashes of the
source path in anonymous-namespace names too). Used to show that opt-in
kernel work leaves the default entry points exactly as the last GPU run measured them.
"""
import os
import re
import subprocess
import sys
import tempfile

KERNELS = "kandinsky-core/kernels"


def entries(ptx: str) -> dict:
    ptx = re.sub(r"\$L__BB\d+_", "$L__BB_", ptx)
    ptx = re.sub(r"// _ZZ.*demoted\n", "", ptx)
    # Names in anonymous namespaces carry hashes of the source path.
    ptx = re.sub(r"(_INTERNAL_|_GLOBAL__N__)[0-9a-f]{8}", r"\1X", ptx)
    ptx = re.sub(r"_cu_[0-9a-f]{8}", "_cu_X", ptx)
    out = {}
    for part in re.split(r"(?=\n\t// \.globl)", ptx):
        m = re.search(r"\.entry (\w+)\(", part)
        if m:
            out[m.group(1)] = part
    return out


def compile_dir(src: str, name: str, out: str) -> dict:
    nvcc = os.environ.get("NVCC", "nvcc")
    cap = os.environ.get("CUDA_COMPUTE_CAP", "90")
    ptx = os.path.join(out, name + ".ptx")
    # As build.rs: the wgmma kernel targets sm_90a (wgmma exists in no other target).
    arch = f"sm_{cap}a" if (name == "flash_attention_wgmma" and cap == "90") else f"sm_{cap}"
    subprocess.run(
        [nvcc, "--ptx", "-O3", "-std=c++17", f"-arch={arch}", "-o", ptx,
         os.path.join(src, name + ".cu")],
        check=True,
    )
    with open(ptx) as f:
        return entries(f.read())


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rev = sys.argv[1]
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                          text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old_src = os.path.join(tmp, "old")
        os.makedirs(old_src)
        files = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{KERNELS}"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
        for f in files.split():
            blob = subprocess.run(["git", "show", f"{rev}:{KERNELS}/{f}"], cwd=root,
                                  capture_output=True, check=True).stdout
            with open(os.path.join(old_src, f), "wb") as fh:
                fh.write(blob)
        new_src = os.path.join(root, KERNELS)
        for cu in sorted(f for f in os.listdir(new_src) if f.endswith(".cu")):
            name = cu[:-3]
            new = compile_dir(new_src, name, tmp)
            old = compile_dir(old_src, name, tmp) if os.path.exists(
                os.path.join(old_src, cu)) else {}
            for entry in sorted(new):
                state = ("new" if entry not in old
                         else "identical" if old[entry] == new[entry] else "DIFFERENT")
                print(f"{cu:28} {entry:40} {state}")


if __name__ == "__main__":
    main()
