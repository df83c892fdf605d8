"""`python -m pipeline.cli` is the `medxplain` command."""
from pipeline.cli import app

app()
