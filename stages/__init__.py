"""Pipeline stages: one command each (``python -m stages.<name>``), run by a flow runner."""
