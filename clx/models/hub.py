"""Moved to :mod:`clx.assets.hub` (model name or local folder → files on disk; no JAX).

Kept so that ``from clx.models import hub`` and ``clx.models.hub.X`` keep working.
"""

from clx.assets.hub import (MINILM_L6_V2, PRETRAINED, REQUIRED_FILES, ModelFolder, Pretrained,
                            check_folder, fetch_pretrained, known_models, resolve,
                            sentence_settings)

__all__ = ["MINILM_L6_V2", "PRETRAINED", "REQUIRED_FILES", "ModelFolder", "Pretrained",
           "check_folder", "fetch_pretrained", "known_models", "resolve", "sentence_settings"]
