"""Without an optional extra, importing the module that needs it says which extra to install."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_the_hf_integration_without_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails, as when absent
    monkeypatch.delitem(sys.modules, "metalr.integrations.hf", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'metalr\[data\]'") as caught:
        importlib.import_module("metalr.integrations.hf")
    assert caught.value.name == "transformers"
