"""Next-basket recommendation at one merchant: baskets, cases, features, metrics, baselines.

Everything here except :mod:`common.nextbasket.model` is torch-free, so that evaluation and the
local baselines run without the training stack. Protocol: docs/evaluation.md.
"""
