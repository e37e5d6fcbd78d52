"""GGUF export for llama.cpp: the text model (f16, q8_0, q4_k_m) and the vision projector (mmproj, f16).

Made with llama.cpp's own tools, as vendored by llama-cpp-python (the `gguf` extra): its converter
(`convert_hf_to_gguf.py` with its `conversion/` package and the matching `gguf-py`; PyPI's `gguf` package does
not match it) turns the merged 16-bit model into GGUF, and the quantizer behind `llama_cpp.llama_model_quantize`
writes the quantized files. The converter is not part of the installed wheel, so it is unpacked once from the
llama-cpp-python source distribution of the installed version into a cache directory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

log = logging.getLogger("runner")
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


class GGUFError(Exception):
    """GGUF export cannot run here (llama-cpp-python missing) or llama.cpp's tools failed."""


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise GGUFError("GGUF needs llama-cpp-python, which is not installed: run `just setup cpu gguf` (or "
                        "`pip install -e '.[gguf]'`; it compiles llama.cpp, 3-9 minutes on 2 cores)") from None


def cache_dir() -> Path:
    return Path(os.environ.get("RECIPE_CACHE", Path.home() / ".cache" / "latex-ocr-recipes"))


def converter_dir(sdist: Path | None = None) -> Path:
    """llama.cpp's converter for the installed llama-cpp-python, unpacked from its sdist on first use."""
    version = llama_cpp_version()
    target = cache_dir() / f"llama.cpp-converter-{version}"
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            log.info("gguf: fetching the llama-cpp-python %s source distribution for llama.cpp's converter", version)
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={version}", "--dest", tmp], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        staging = Path(tmp) / "converter"
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and relative.startswith(CONVERTER_PARTS) and member.isfile():
                    member.name = relative
                    archive.extract(member, staging, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), target)
    return target


def convert(model_dir: Path, out_file: Path, mmproj: bool = False) -> Path:
    """Runs llama.cpp's converter on a Hugging Face model directory; f16 output."""
    command = [sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), str(model_dir),
               "--outfile", str(out_file), "--outtype", "f16", *(["--mmproj"] if mmproj else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not out_file.exists():
        raise GGUFError(f"llama.cpp's converter failed ({' '.join(command)}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return out_file


def quantize(source: Path, target: Path, kind: str) -> Path:
    """llama.cpp's quantizer (llama_model_quantize) from f16 GGUF to q8_0 or q4_k_m."""
    import llama_cpp

    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[kind]
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.exists():
        raise GGUFError(f"llama.cpp's quantizer returned {status} for {source} -> {kind}")
    return target


README = """# GGUF for llama.cpp

Fine-tuned from `{base_model}` for LaTeX OCR on `{trained_on}` with the recipe runner. Files:

{files}

## Run it

```bash
llama-mtmd-cli -m {final}/{text} --mmproj {final}/mmproj-f16.gguf --image formula.png \\
    -p "{instruction}" --temp 0
```

or from Python (llama-cpp-python), with the same prompt as training:

```bash
recipe predict formula.png --model {final}/{text}
```
"""


def export_gguf(merged_dir: Path, final: Path, base_model: str, trained_on: str, quantizations: list[str],
                instruction: str) -> Path:
    """Writes model-<quantization>.gguf for each quantization and mmproj-f16.gguf into `final`, atomically."""
    from .export import staged

    converter_dir()  # fail before any work if llama-cpp-python is missing
    with staged(final) as staging:
        f16 = convert(merged_dir, staging / "model-f16.gguf")
        convert(merged_dir, staging / "mmproj-f16.gguf", mmproj=True)
        for kind in quantizations:
            if kind != "f16":
                quantize(f16, staging / f"model-{kind}.gguf", kind)
        if "f16" not in quantizations:
            f16.unlink()
        # The training processor's pixel bounds: `recipe predict` resizes images as training did.
        shutil.copy(merged_dir / "processor_config.json", staging / "processor_config.json")
        text = next(n for n in ("model-q4_k_m.gguf", "model-q8_0.gguf", "model-f16.gguf") if (staging / n).exists())
        files = "\n".join(f"- `{p.name}`: {p.stat().st_size / 2**20:,.1f} MiB" for p in sorted(staging.glob("*.gguf")))
        (staging / "README.md").write_text(README.format(base_model=base_model, trained_on=trained_on, files=files,
                                                         final=final, text=text, instruction=instruction))
    for path in sorted(final.glob("*.gguf")):
        log.info("gguf: %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return final
