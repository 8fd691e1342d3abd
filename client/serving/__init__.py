"""Recommendations at the merchant: the model mirror's versions scored on the merchant's own data.

Everything here runs on the merchant's machine and keeps customer data there: impressions,
purchases and their attribution stay in the merchant's state directory; only aggregate per-arm
counts of an A/B test (client/serving/ab_report.py) are ever meant to leave it.
"""
