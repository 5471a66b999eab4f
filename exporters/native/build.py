"""Build the native ONNX Runtime kernels of ``ai.slimformer::A2SFCacheUpdate`` (``make kernels``).

::

    python exporters/native/build.py              # CPU library, and the CUDA one where nvcc exists
    python exporters/native/build.py --no-cuda    # CPU library only
    python exporters/native/build.py --force      # rebuild even when up to date

What it does:

1. **Headers.** ORT's C API headers ship in no pip wheel and no Debian package; they are inside the npm
   package ``com.github.asus4.onnxruntime@0.4.9`` (a Unity distribution of ORT's prebuilt binaries,
   ~150 MB, ``ORT_API_VERSION`` 29). ``npm pack`` downloads it once (npm checks the registry's
   integrity hash), the ``*.h`` files of its xcframework are extracted into
   ``$SLIMFORMER_CACHE/ort-headers/`` (default ``~/.cache/slimformer``) and the tarball is deleted.
   They are third-party files and never enter the repository. ``--headers DIR`` (or
   ``$SLIMFORMER_ORT_HEADERS``) uses a directory holding ``onnxruntime_c_api.h`` instead (offline).
2. **CPU library** ``libslimformer_a2sf.so``: ``g++`` (``$CXX``), one translation unit, ``-O3``. It links
   nothing of ORT: ORT passes its API table to ``RegisterCustomOps``.
3. **CUDA library** ``libslimformer_a2sf_cuda.so`` (CUDA and CPU kernels, static CUDA runtime): ``nvcc``
   from ``PATH``, ``$CUDA_HOME`` or ``/usr/local/cuda*``, for ``--cuda-archs`` (default
   ``80,90,100,120`` plus PTX of the newest, so newer GPUs JIT it). Skipped, with a message, without nvcc.
4. ``manifest.json`` beside the libraries: the sources' digest, header version and the tools used.
   ``exporters.native.find_library`` refuses a library whose sources changed since.

Output goes to ``exporters/native/build/`` (git-ignored) or ``--build-dir`` / ``$SLIMFORMER_KERNELS_DIR``.
The script needs only the standard library, so it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCES = ("a2sf_cache_op.h", "a2sf_cache_op.cc", "a2sf_cache_op_cuda.cu")
CPU_SOURCES = ("a2sf_cache_op.cc",)
CUDA_SOURCES = ("a2sf_cache_op.cc", "a2sf_cache_op_cuda.cu")
LIBRARIES = {"cpu": "libslimformer_a2sf.so", "cuda": "libslimformer_a2sf_cuda.so"}
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

NPM_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
HEADER_MEMBER = re.compile(
    r"^package/Plugins/iOS~/onnxruntime\.xcframework/([^/]+)/onnxruntime\.framework/Headers/([^/]+\.h)$"
)
MIN_HEADER_API = (
    18  # the library requests API 18 at run time (a2sf_cache_op.h), so older headers lack symbols
)
DEFAULT_CUDA_ARCHS = "80,90,100,120"


class BuildError(RuntimeError):
    """A build step failed; the message says which and how to fix it."""


def default_build_dir() -> Path:
    return Path(os.environ.get("SLIMFORMER_KERNELS_DIR") or HERE / "build")


def cache_root() -> Path:
    return Path(os.environ.get("SLIMFORMER_CACHE") or Path.home() / ".cache" / "slimformer")


def sources_digest(directory: Path = HERE) -> str:
    """SHA-256 over the kernel sources (name and content), to tell a stale build from a current one."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    return digest.hexdigest()


def header_api_version(headers: Path) -> int:
    match = re.search(r"^#define ORT_API_VERSION (\d+)", (headers / "onnxruntime_c_api.h").read_text(), re.M)
    if not match:
        raise BuildError(f"{headers}/onnxruntime_c_api.h defines no ORT_API_VERSION")
    return int(match.group(1))


# ---- headers ----------------------------------------------------------------------------------------


def fetch_headers(cache: Path | None = None, log: Any = print) -> tuple[Path, dict[str, Any]]:
    """The header directory from the npm package, downloaded and extracted once into the cache."""
    target = (cache or cache_root()) / "ort-headers" / NPM_PACKAGE.replace("@", "-")
    info_file = target / "source.json"
    if (target / "onnxruntime_c_api.h").is_file() and info_file.is_file():
        return target, json.loads(info_file.read_text())
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            "npm is not installed, and ORT's C API headers come from an npm package: install "
            "Node.js/npm, or pass --headers DIR (a directory with onnxruntime_c_api.h)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"[kernels] downloading ORT's C API headers ({NPM_PACKAGE}, ~150 MB, once) ...")
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        done = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--json", "--pack-destination", scratch],
            capture_output=True,
            text=True,
            cwd=scratch,
        )
        if done.returncode != 0:
            raise BuildError(
                f"`npm pack {NPM_PACKAGE}` failed (is the npm registry reachable?): "
                f"{done.stderr.strip()[-400:]}"
            )
        packed = json.loads(done.stdout)[0]
        tarball = Path(scratch) / packed["filename"]
        extracted = Path(scratch) / "headers"
        extracted.mkdir()
        with tarfile.open(tarball) as archive:
            members = [(m, HEADER_MEMBER.match(m.name)) for m in archive.getmembers() if m.isfile()]
            slices = sorted({match.group(1) for _, match in members if match})
            if not slices:
                raise BuildError(f"{NPM_PACKAGE} no longer holds the xcframework headers")
            # Every slice of the xcframework carries the same headers; take one.
            for member, match in members:
                if match and match.group(1) == slices[0]:
                    with archive.extractfile(member) as source:
                        (extracted / match.group(2)).write_bytes(source.read())
        info = {
            "package": NPM_PACKAGE,
            "integrity": packed.get("integrity"),
            "slice": slices[0],
            "api_version": header_api_version(extracted),
        }
        (extracted / "source.json").write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    return target, info


def local_headers(directory: Path) -> tuple[Path, dict[str, Any]]:
    if not (directory / "onnxruntime_c_api.h").is_file():
        raise BuildError(f"{directory} has no onnxruntime_c_api.h")
    return directory, {"package": f"local:{directory}", "api_version": header_api_version(directory)}


# ---- compilers --------------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = [Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"] if os.environ.get("CUDA_HOME") else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)]
    return next((str(c) for c in candidates if c.is_file()), None)


def tool_version(tool: str) -> str:
    done = subprocess.run([tool, "--version"], capture_output=True, text=True)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    # g++ names itself on the first line; nvcc says "Cuda compilation tools, release X" near the end.
    release = [line for line in lines if "release" in line]
    return release[-1] if release else (lines[0] if lines else "unknown")


def compile_library(command: list[str], output: Path, log: Any) -> float:
    """Run one compiler command into a temporary file, then move it into place atomically: a process that
    already mapped the old library keeps a valid file."""
    temporary = output.with_name(output.name + ".tmp")
    start = time.perf_counter()
    done = subprocess.run([*command, "-o", str(temporary)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise BuildError(
            f"{Path(command[0]).name} failed building {output.name}:\n{done.stderr.strip()[-3000:]}"
        )
    if done.stderr.strip():
        log(done.stderr.strip())
    os.replace(temporary, output)
    return seconds


def cpu_command(headers: Path) -> list[str]:
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler ({compiler}); install g++ (apt-get install g++) or set CXX")
    return [
        compiler,
        "-O3",
        "-std=c++17",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-Wall",
        "-Wextra",
        # -z defs: prove the library needs nothing from libonnxruntime (ORT hands over its API table).
        "-Wl,-z,defs",
        f"-I{headers}",
        *(str(HERE / s) for s in CPU_SOURCES),
    ]


def cuda_command(nvcc: str, headers: Path, archs: str) -> list[str]:
    numbers = [a.strip() for a in archs.split(",") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in numbers]
    gencode.append(f"-gencode=arch=compute_{numbers[-1]},code=compute_{numbers[-1]}")  # PTX for newer GPUs
    return [
        nvcc,
        "-O3",
        "-std=c++17",
        "-shared",
        "--cudart=static",
        "-Xcompiler=-fPIC,-fvisibility=hidden,-Wall",
        "-DSLIMFORMER_A2SF_CUDA",
        f"-I{headers}",
        *gencode,
        *(str(HERE / s) for s in CUDA_SOURCES),
    ]


# ---- the build --------------------------------------------------------------------------------------


def read_manifest(build_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((build_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def build(
    build_dir: Path | None = None,
    *,
    cuda: bool | None = None,
    cuda_archs: str | None = None,
    headers: Path | None = None,
    force: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Build the libraries into ``build_dir``; returns the manifest. ``cuda``: ``None`` = where nvcc is
    present, ``False`` = skip, ``True`` = required. Up-to-date libraries are left alone unless ``force``."""
    build_dir = build_dir or default_build_dir()
    archs = cuda_archs or os.environ.get("SLIMFORMER_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    digest = sources_digest()
    nvcc = find_nvcc() if cuda is not False else None
    if cuda and nvcc is None:
        raise BuildError("--cuda was asked for but no nvcc was found (PATH, $CUDA_HOME, /usr/local/cuda*)")

    previous = read_manifest(build_dir)
    if previous and not force and previous.get("sources_sha256") == digest:
        libraries = previous.get("libraries", {})
        wanted = ["cpu"] + (["cuda"] if nvcc else [])
        if all(name in libraries and (build_dir / libraries[name]["file"]).is_file() for name in wanted) and (
            not nvcc or libraries["cuda"].get("archs") == archs
        ):
            log(f"[kernels] up to date in {build_dir} ({', '.join(sorted(libraries))})")
            return {**previous, "up_to_date": True}

    header_dir, header_info = local_headers(headers) if headers else fetch_headers(log=log)
    if header_info["api_version"] < MIN_HEADER_API:
        raise BuildError(
            f"the headers are ORT API {header_info['api_version']}; at least {MIN_HEADER_API} is needed"
        )
    build_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "sources_sha256": digest,
        "headers": header_info,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "libraries": {},
    }

    command = cpu_command(header_dir)
    log(f"[kernels] g++ -> {build_dir / LIBRARIES['cpu']}")
    seconds = compile_library(command, build_dir / LIBRARIES["cpu"], log)
    manifest["libraries"]["cpu"] = {
        "file": LIBRARIES["cpu"],
        "compiler": tool_version(command[0]),
        "seconds": round(seconds, 1),
    }

    if nvcc:
        log(f"[kernels] nvcc (sm {archs}) -> {build_dir / LIBRARIES['cuda']}")
        seconds = compile_library(cuda_command(nvcc, header_dir, archs), build_dir / LIBRARIES["cuda"], log)
        manifest["libraries"]["cuda"] = {
            "file": LIBRARIES["cuda"],
            "compiler": tool_version(nvcc),
            "archs": archs,
            "seconds": round(seconds, 1),
        }
    else:
        (build_dir / LIBRARIES["cuda"]).unlink(missing_ok=True)  # never leave a stale CUDA library behind
        manifest["cuda_skipped"] = "disabled (--no-cuda)" if cuda is False else "no nvcc found"
        log(
            f"[kernels] CUDA library skipped: {manifest['cuda_skipped']} (the CUDA provider then runs the "
            "op's ONNX function body)"
        )
    (build_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--build-dir", type=Path, default=None, help="output directory (default exporters/native/build)"
    )
    parser.add_argument(
        "--headers",
        type=Path,
        default=os.environ.get("SLIMFORMER_ORT_HEADERS") or None,
        help="use this directory of ORT C API headers instead of fetching them from npm",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-cuda", dest="cuda", action="store_false", default=None, help="CPU library only")
    group.add_argument(
        "--cuda", dest="cuda", action="store_true", help="fail when the CUDA library cannot be built"
    )
    parser.add_argument(
        "--cuda-archs", default=None, help=f"SM versions, comma-separated (default {DEFAULT_CUDA_ARCHS})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the libraries are up to date")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        manifest = build(
            args.build_dir, cuda=args.cuda, cuda_archs=args.cuda_archs, headers=args.headers, force=args.force
        )
    except BuildError as exc:
        print(f"[kernels] error: {exc}", file=sys.stderr)
        sys.exit(1)
    if not manifest.get("up_to_date"):
        built = ", ".join(f"{name} ({lib['seconds']} s)" for name, lib in manifest["libraries"].items())
        print(f"[kernels] done in {time.perf_counter() - start:.1f} s: {built}")


if __name__ == "__main__":
    main()
