"""Orchestration: Prefect flows, stage runners and the local service stack."""
