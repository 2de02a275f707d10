"""Doctest namespace: every public class's doctest may use ``torch`` without importing it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
