"""Serving: the published backbone as an MLflow pyfunc model (loaded without pickles)."""
