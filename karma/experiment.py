import typer


def experiment() -> None:
    """Not built yet."""
    raise typer.Exit("not built yet")
