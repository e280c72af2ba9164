"""Experiments: whole runs on one machine that use every layer below (core, server, client).

``simulate`` (a federation in Flower's simulation engine), ``compare`` (local vs pooled vs
federated over seeds), ``demo`` (a real deployment on loopback), ``local`` (one site or a
pooled set trained alone) and ``partition`` (virtual sites cut from pooled data). Only this
package and :mod:`fedmed.cli` may import :mod:`fedmed.server` or :mod:`fedmed.client`.
"""
