"""llama.cpp as the reference for the GGUF tests: its converter (convert_hf_to_gguf.py,
from a llama.cpp checkout) and its quantizer (through llama-cpp-python).

Both run in subprocesses: the converter needs its own gguf-py ahead of the installed
gguf package, and a C-level crash in the quantizer must fail a test, not end pytest.

Run as a script this file is that subprocess:
    python tests/llama_cpp_tools.py convert LLAMA_CPP_DIR OUTTYPE HF_DIR OUT.gguf [HF_DIR OUT.gguf ...]
    python tests/llama_cpp_tools.py quantize IN.gguf OUT.gguf FTYPE
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def llama_cpp_dir() -> Path | None:
    """The llama.cpp checkout holding convert_hf_to_gguf.py, or None when there is none.
    FALCONET_LLAMA_CPP_DIR overrides the default (.cache/llama.cpp in the repository)."""
    folder = Path(os.environ.get("FALCONET_LLAMA_CPP_DIR", REPO / ".cache" / "llama.cpp"))
    return folder if (folder / "convert_hf_to_gguf.py").is_file() else None


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=300
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def convert(pairs: list[tuple[Path, Path]], outtype: str = "f32") -> None:
    """(HF folder, GGUF path) pairs -> GGUF files, with llama.cpp's own converter (one
    process for all: importing it takes most of the time)."""
    folder = llama_cpp_dir()
    assert folder is not None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder / "gguf-py"), str(folder)]))
    _run(["convert", str(folder), outtype, *(str(p) for pair in pairs for p in pair)], env)


def quantize(src: Path, dst: Path, ftype: str) -> None:
    """GGUF -> GGUF of llama file type `ftype` (e.g. "MOSTLY_Q4_0") with llama.cpp."""
    _run(["quantize", str(src), str(dst), ftype])


def _convert_main(folder: str, outtype: str, *paths: str) -> None:
    sys.path[:0] = [str(Path(folder) / "gguf-py"), folder]
    from conversion import base

    # The converter names the pre-tokenizer by hashing the token ids of a fixed text and
    # refuses tokenizers whose hash it does not know. The tests' tiny tokenizers are
    # trained in the test (unknown hashes) but use Falcon's pre-tokenizer, so this one
    # method is replaced to give the answer it gives for tiiuae/falcon-7b.
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "falcon"
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        # The llama converter imports sentencepiece before it looks for tokenizer.model.
        # Without the package, answer as it does for a folder without tokenizer.model
        # (the tests' tokenizers are byte-level BPE): it then tries the next vocab kind.
        def no_tokenizer_model(self):
            raise FileNotFoundError("no tokenizer.model (sentencepiece is not installed)")

        base.TextModel._create_vocab_sentencepiece = no_tokenizer_model
    import convert_hf_to_gguf

    for hf_dir, out in zip(paths[::2], paths[1::2], strict=True):
        sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", outtype]
        convert_hf_to_gguf.main()


def _quantize_main(src: str, dst: str, ftype: str) -> None:
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize returned {rc}")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"convert": _convert_main, "quantize": _quantize_main}[command](*rest)
