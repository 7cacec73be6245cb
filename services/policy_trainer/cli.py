import typer


def train() -> None:
    """Not built yet."""
    raise typer.Exit("not built yet")
