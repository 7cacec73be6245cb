import typer


def serve() -> None:
    """Not built yet."""
    raise typer.Exit("not built yet")
