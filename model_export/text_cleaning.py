"""Text clean-up that a frozen text tower applies before tokenisation, repeated torch-free at serving.

A bundle records the recipe by name (``FrozenTextEncoder.text_preprocessing``); the runtime looks it up
here, so a query is cleaned exactly as the report chunks were when the model was trained and evaluated:

* ``none``: identity (all-MiniLM-L6-v2);
* ``open_clip_whitespace_clean``: what open_clip's ``HFTokenizer`` does for BiomedCLIP (``clean="whitespace"``):
  ``ftfy.fix_text``, HTML-unescape twice, strip, collapse runs of whitespace to one space.
"""

from __future__ import annotations

import html
from collections.abc import Callable

from model_export.errors import BundleMismatchError


def _identity(text: str) -> str:
    return text


def _open_clip_whitespace_clean(text: str) -> str:
    try:
        import ftfy
    except ImportError as error:  # pragma: no cover - ftfy is a core dependency
        raise BundleMismatchError("this bundle's text recipe needs ftfy (pip install ftfy)") from error
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip()


TEXT_RECIPES: dict[str, Callable[[str], str]] = {
    "none": _identity,
    "open_clip_whitespace_clean": _open_clip_whitespace_clean,
}


def text_cleaner(recipe: str) -> Callable[[str], str]:
    """The clean-up function for ``recipe``; an unknown name is a bundle this runtime cannot serve."""
    try:
        return TEXT_RECIPES[recipe]
    except KeyError:
        raise BundleMismatchError(
            f"unknown text preprocessing {recipe!r}; this runtime knows {sorted(TEXT_RECIPES)}"
        ) from None
