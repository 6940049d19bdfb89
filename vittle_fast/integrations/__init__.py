"""Vittle in other libraries' models and trainers (``vittle_fast.integrations.transformers``)."""
