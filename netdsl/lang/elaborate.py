"""Elaboration's entry point: a spec file to its graph, through a cache of graphs.

The elaborator itself is `elaborator.py`. A process that finds a valid cached graph
never imports it, nor Lark and the parser: for ResNet-50 that is ~0.12 s of a
0.14 s elaboration (see graph_cache.py for what keys and invalidates an entry).
"""
from __future__ import annotations

from ..ir.graph import Graph
from . import graph_cache


def elaborate(path: str, network: str | None = None,
              overrides: dict | None = None) -> tuple[Graph, graph_cache.Sources]:
    """(graph, sources): the network `network` (default: the file's last) of the spec at
    `path`, with `overrides` for its arguments; sources.sources maps each file read,
    by its shown name, to its text (for diagnostics and the checkpoint's spec hash)."""
    entry = graph_cache.Entry(path, network, overrides)
    hit = entry.load()
    if hit is not None:
        return hit
    from .elaborator import elaborate_uncached
    g, loader = elaborate_uncached(path, network, overrides)
    entry.store(g, loader.sources)
    return g, graph_cache.Sources(loader.sources)
